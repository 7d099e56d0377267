"""The evaluation loop of test.py: trained checkpoints on a labelled data set, class by class,
then the macro mean, written as results_<dataset>.{json,csv,md}.

The model is read from the checkpoint (`--model` picks one when a folder holds several) and
scores through its predictor, with its own preprocessing. Each model's paper protocol gives the
image score; AA-CLIP's (spec aaclip.md §14): maps summed over levels, per-class min-max of maps
and detection scores, image score `0.5 * map max + 0.5 * det` (industrial) or the map max
(medical). That min-max is transductive: fine for paper tables, not for deployment (predict.py).

Classes stream through one loader: a class's maps go batch by batch into its metrics, so no
full-size map of a class is held unless panels are asked for; with several checkpoints
(`--all_epochs`) a class is decoded once and scored by each of them. At native resolution
(`--metric_resolution native`: MVTec AD 2's default, and `--tile`'s) the images and masks are
read at their own resolution, one image per batch, and each image's map at that resolution
(`models.tiling`: whole, resized back from the input; or stitched from tiles) streams into the
metrics against the full-resolution mask.

MVTec AD 2 (`--metrics mvtec_ad2`, its default): before a class's test images, its
validation/good images are predicted by exactly the same predictor, preprocessing, tiling and
k-shot memory, and their maps stream into `ValidationThreshold`, SegF1's threshold (the test
labels are never read for it); the thresholds go into the results' meta. Its private splits are
unlabelled: no metric, each image's map is written at full resolution into `--submission` with
the class's threshold, image by image, and the tree is checked at the end. Without `--tile` a
full-resolution map is the model-size map resized bilinearly over the region the model saw
(`Geometry.to_image`, `NativePredictor`); with `--tile` it is the stitched map itself.
`--save_maps` writes the same full-resolution maps of a labelled split as float16 TIFFs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, default_collate

from datasets.anomaly import TestDataset, build_test_datasets
from datasets.catalog import (
    MVTEC_AD2_PRIVATE_SPLITS,
    DataConfig,
    DatasetInfo,
    mvtec_ad2_info,
    real_name,
)
from datasets.metadata import load_test_records, log_resized_masks
from datasets.preprocessing import read_image
from datasets.support import draw_support, load_images
from datasets.synthetic import ensure_synthetic
from datasets.tiling import TileConfig
from models.base import MapExtrema
from models.predictor import AnomalyPredictor, Predictor
from models.registry import MODELS, checkpoint_stem, find_checkpoint, load_trained_model
from models.tiling import NativePredictor, at_resolution
from utils.core.checkpoint import TRAIN_LOCK, held
from utils.core.config import RUN, TEST, setting, settings_of, to_mapping
from utils.core.errors import CheckpointError, ConfigError, DataError
from utils.core.names import safe_name, safe_relative
from utils.core.runtime import (
    ExportReadConfig,
    RuntimeConfig,
    loader_workers,
    progress,
    resolve_device,
    seed_everything,
)
from utils.evaluation.metrics import (
    COLUMNS_FULL,
    COLUMNS_MVTEC_AD2,
    COLUMNS_OFFICIAL,
    DEFAULT_SEG_PERCENTILE,
    PRO_VARIANTS,
    ClassEvaluator,
    ValidationThreshold,
)
from utils.evaluation.report import write_results
from utils.evaluation.submission import check_submission, write_anomaly_map, write_float16_tiff
from utils.evaluation.visualize import save_panels

logger = logging.getLogger("test")

METRIC_SETS = {"full": COLUMNS_FULL, "official": COLUMNS_OFFICIAL, "mvtec_ad2": COLUMNS_MVTEC_AD2}
# A map at an image's full resolution, handed over image by image: (record path, map [H, W]).
MapSink = Callable[[str, np.ndarray], None]


@dataclasses.dataclass
class EvalConfig(TileConfig, ExportReadConfig, RuntimeConfig, DataConfig):
    """test.py: which checkpoints, on which data, with which metrics and outputs."""

    save_path: Path = setting(
        Path("ckpt/aaclip"), "run folder whose checkpoints are evaluated", kind=RUN
    )
    model: str | None = setting(
        None,
        "which model's checkpoints to evaluate; default: the one found in the save path",
        kind=RUN,
        choices=tuple(MODELS),
    )
    checkpoint: Path | None = setting(
        None,
        "evaluate this checkpoint file, or this run folder's evaluated file (default: the save "
        "path's image_adapter.pth, feclip_best.pth, ...)",
        kind=RUN,
    )
    all_epochs: bool = setting(
        False,
        "evaluate every per-epoch file (image_adapter_<e>.pth, ...) in numeric order, class by "
        "class: a class's images are decoded once and held (about 3 MB per image at 518 px) "
        "while every file scores them",
        kind=RUN,
    )
    results_dir: Path | None = setting(
        None,
        "where results_<dataset>.{json,csv,md} go (default: the checkpoint's folder)",
        kind=RUN,
    )
    batch_size: int = setting(
        32, "images per forward", kind=RUN, minimum=1, aliases={"test_batch_size": 0}
    )
    metrics: str | None = setting(
        None,
        "full: 7 columns; official: AA-CLIP's 4 columns, undefined as 0, 2 decimals of rounded "
        "values; mvtec_ad2: MVTec AD 2's SegF1, AUPRO@0.05, AUPRO, P-AUROC, I-AUROC and "
        "SegF1-oracle (the best test threshold, analysis only), SegF1 thresholded per class on "
        "its validation/good maps; unset: mvtec_ad2 for --dataset MVTecAD2, else full",
        kind=RUN,
        choices=tuple(METRIC_SETS),
    )
    pro_variant: str = setting(
        "exact",
        "AUPRO as MVTec defines it, AnomalyCLIP's 200-step approximation, or SOWA's (the same "
        "with the mean of per-image FPRs)",
        kind=RUN,
        choices=PRO_VARIANTS,
    )
    fpr_limit: float = setting(
        0.3, "AUPRO integrates the PRO curve up to this FPR", kind=RUN, above=0, maximum=1
    )
    k_shot: int = setting(
        0,
        "SOWA: a memory of k normal train-split images per class (0: zero-shot)",
        kind=RUN,
        minimum=0,
    )
    support_seed: int = setting(
        42, "seed of the k-shot support draw (the original draws unseeded)", kind=RUN
    )
    undefined_metric: str | None = setting(
        None,
        "undefined metrics (one label only): NaN skipped in the mean, or 0 as the original; "
        "unset: nan, zero with --metrics official",
        kind=RUN,
        choices=("nan", "zero"),
    )
    decimals: int | None = setting(
        None, "printed decimals; unset: 1, official 2", kind=RUN, minimum=0
    )
    visualize: bool = setting(
        False, "write [image | ground truth | heat map] panels per test image", kind=RUN
    )
    vis_size: str = setting(
        "model",
        "panel resolution: the model input or the image's own size",
        kind=RUN,
        choices=("model", "original"),
    )
    backend: str = setting(
        "torch",
        "torch: the checkpoints; onnxruntime, openvino: the graph of --export, with exactly "
        "these metrics and tables",
        kind=RUN,
        choices=("torch", "onnxruntime", "openvino"),
    )
    export: Path | None = setting(
        None, "with --backend onnxruntime|openvino: a `predict.py export` folder", kind=RUN
    )
    submission: Path | None = setting(
        None,
        "--dataset MVTecAD2 --split test_private|test_private_mixed: write the benchmark "
        "server's submission tree into this folder (full-resolution maps, binarised with each "
        "class's validation threshold) and check it; run both splits into the same folder",
        kind=RUN,
    )
    save_maps: Path | None = setting(
        None,
        "write each test image's full-resolution map as a float16 TIFF, DIR/<record path>.tiff "
        "(MVTec AD 2: DIR/<class>/test_public/{good,bad}/<stem>.tiff)",
        kind=RUN,
    )
    metric_resolution: str | None = setting(
        None,
        "input: pixel metrics at the model input, masks resized to it (the papers' protocol); "
        "native: at each image's own resolution against its full-resolution mask, the map "
        "resized back bilinearly (one image per forward; MVTec AD 2's protocol, where thin "
        "defects vanish from resized masks); unset: native for --dataset MVTecAD2 and with "
        "--tile, else input",
        kind=RUN,
        choices=("input", "native"),
    )

    def resolve(self) -> EvalConfig:
        """The settings left unset filled in: data root, undefined-metric rule, decimals."""
        if self.tile and self.metric_resolution == "input":
            raise ConfigError(
                "--tile stitches maps at each image's own resolution: drop --metric_resolution "
                "input, or --tile"
            )
        if self.native and self.visualize:
            raise ConfigError(
                "--visualize draws panels at the model input; "
                + (
                    "with --tile the maps are at each image's resolution: leave one of them out"
                    if self.tile
                    else "pass --metric_resolution input with it (MVTec AD 2 is scored at "
                    "native resolution by default)"
                )
            )
        metrics = self.metric_set()
        if metrics == "mvtec_ad2" and self.dataset != "MVTecAD2":
            raise ConfigError(
                "--metrics mvtec_ad2 thresholds SegF1 on MVTec AD 2's validation/good images; "
                "use it with --dataset MVTecAD2"
            )
        if self.unlabelled and self.submission is None:
            raise ConfigError(
                f"--split {self.split} is unlabelled: test.py computes no metric on it and only "
                "writes the benchmark server's submission; pass --submission DIR"
            )
        if self.submission is not None and not self.unlabelled:
            raise ConfigError(
                "--submission holds MVTec AD 2's private splits; use it with --dataset MVTecAD2 "
                f"--split {' or '.join(MVTEC_AD2_PRIVATE_SPLITS)}"
            )
        for flag, value in (("--submission", self.submission), ("--save_maps", self.save_maps)):
            if value is not None and self.all_epochs:
                raise ConfigError(
                    f"{flag} writes the maps of one checkpoint; pass --checkpoint FILE instead "
                    "of --all_epochs"
                )
        official = metrics == "official"
        return dataclasses.replace(
            self,
            metrics=metrics,
            metric_resolution="native" if self.native else "input",
            data_root=self.root(),
            undefined_metric=self.undefined_metric or ("zero" if official else "nan"),
            decimals=self.decimals if self.decimals is not None else (2 if official else 1),
        )

    @property
    def native(self) -> bool:
        """Whether maps and masks are compared at each image's own resolution
        (`--metric_resolution`)."""
        if self.metric_resolution is not None:
            return self.metric_resolution == "native"
        return bool(self.tile) or self.dataset == "MVTecAD2"

    @property
    def unlabelled(self) -> bool:
        """Whether the split read has no labels (MVTec AD 2's private splits): no metric."""
        return self.dataset == "MVTecAD2" and self.split in MVTEC_AD2_PRIVATE_SPLITS

    @property
    def columns(self) -> list[str]:
        """The table's columns (none on an unlabelled split)."""
        if self.unlabelled:
            return []
        return METRIC_SETS[self.metric_set()]

    def metric_set(self) -> str:
        """`--metrics`, else mvtec_ad2 for MVTec AD 2 and full for every other data set."""
        return self.metrics or ("mvtec_ad2" if self.dataset == "MVTecAD2" else "full")

    @property
    def needs_threshold(self) -> bool:
        """Whether each class needs its SegF1 threshold from its validation/good maps."""
        return "SegF1" in self.columns or self.submission is not None

    def output_folder(self) -> Path:
        """Where results, panels and test.log go: --results_dir, else the checkpoint's folder."""
        if self.results_dir is not None:
            return self.results_dir
        if self.backend != "torch" and self.export is not None:
            return self.export
        if self.checkpoint is not None:
            return self.checkpoint if self.checkpoint.is_dir() else self.checkpoint.parent
        return self.save_path


@dataclasses.dataclass
class EvaluatedFile:
    """One checkpoint's results: per class its metrics and per-image scores, and what produced
    them."""

    path: Path
    epoch: int | None
    per_class: dict[str, dict[str, float]]
    images: dict[str, list[dict[str, Any]]]
    meta: dict[str, Any]


@dataclasses.dataclass
class ClassResult:
    """One class under one checkpoint: its metrics, and per image its file (the record's
    path), label, `predict`'s image score and the paper-table image score."""

    metrics: dict[str, float]
    images: list[dict[str, Any]]
    threshold: float | None = None  # SegF1's, from the class's validation/good maps


def checkpoint_files(config: EvalConfig) -> tuple[str, list[Path]]:
    """(model name, files to evaluate); every per-epoch file in numeric order for --all_epochs."""
    trust = config.trust_checkpoint
    if config.checkpoint is not None:
        if not config.checkpoint.exists():
            raise CheckpointError(f"--checkpoint {config.checkpoint} does not exist")
        model, file = find_checkpoint(config.checkpoint, config.model, trust)
        return model, [file]
    if not config.all_epochs:
        model, main_file = find_checkpoint(config.save_path, config.model, trust)
        return model, [main_file]
    for model in [config.model] if config.model else list(MODELS):
        epoch_file = re.compile(rf"{re.escape(checkpoint_stem(model))}_(\d+)\.pth")
        files = [p for p in config.save_path.glob("*.pth") if epoch_file.fullmatch(p.name)]
        if files:
            _warn_if_training(config.save_path, len(files))
            return model, sorted(files, key=lambda path: int(epoch_file.fullmatch(path.name)[1]))
    raise CheckpointError(f"no per-epoch checkpoints in {config.save_path}; train first")


def _warn_if_training(save_path: Path, count: int) -> None:
    """One warning when a training still holds `save_path`: its later epochs are not evaluated
    (each per-epoch file is written whole, so the ones there are complete)."""
    owner = held(save_path / TRAIN_LOCK)
    if owner is not None:
        pid, host = owner
        logger.warning(
            "a training (PID %s on %s) is still writing to %s: only the epochs saved so far (%d) "
            "are evaluated; run test.py again when it ends for the rest",
            pid if pid is not None else "?",
            host or "?",
            save_path,
            count,
        )


@dataclasses.dataclass
class ClassOutputs:
    """What the evaluation keeps of a class's predictions: per image the detection score, label,
    paths and map extrema; the full-size maps, masks and model-size pixels only for panels."""

    det_scores: np.ndarray  # [n]
    labels: np.ndarray  # [n] int64
    extrema: MapExtrema  # each raw map's minimum and maximum, [n] each
    paths: list[str]
    file_names: list[str]
    maps: np.ndarray | None = None  # [n, S, S] float32
    masks: np.ndarray | None = None  # [n, S, S] bool
    pixels: np.ndarray | None = None  # [n, S, S, 3] uint8: the model's input before normalising


def collate_test(items: list[dict]) -> dict:
    """`default_collate`, with masks as bool `[B, S, S]` (a quarter of the float masks)."""
    batch = default_collate(items)
    batch["mask"] = batch["mask"][:, 0].bool()
    return batch


def class_batches(
    datasets: dict[str, TestDataset], batch_size: int, num_workers: int, device: torch.device
) -> Iterator[tuple[str, Iterator[dict]]]:
    """(class name, that class's batches) in order, from one loader over every class: its
    workers start once and keep decoding the next class while a class's metrics are computed
    (a loader per class would idle the device at every class's start). No batch mixes classes.
    """
    ranges, start = [], 0
    for dataset in datasets.values():
        stop = start + len(dataset)
        ranges += [
            list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)
        ]
        start = stop
    loader = DataLoader(
        ConcatDataset(list(datasets.values())),
        batch_sampler=ranges,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_test,
    )
    return itertools.groupby(loader, key=lambda batch: batch["class_name"][0])


def full_resolution(preprocessing: Any, anomaly_map: np.ndarray, image_path: str) -> np.ndarray:
    """A model-size map `[S, S]` -> `[H, W]` at the full resolution of the image file (its size
    from the header): resized bilinearly over the region the model saw (`Geometry.to_image`)."""
    with Image.open(image_path) as image:
        geometry = preprocessing.geometry_of(*image.size)
    return geometry.to_image(anomaly_map)


class NormalMaps:
    """Takes a class's validation/good maps where `predict_class` streams test maps into a
    `ClassEvaluator`, and feeds them to a `ValidationThreshold` (every pixel is normal)."""

    def __init__(self, threshold: ValidationThreshold) -> None:
        self.threshold = threshold

    def update(self, maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None) -> None:
        """maps: [B, H, W]; masks: unused (normal images); valid: [B, H, W] bool or None."""
        self.threshold.update(maps, valid)


def validation_threshold(
    predictor: Predictor | NativePredictor,
    dataset: TestDataset,
    batches: Iterable[dict],
    prompt_name: str,
    show_progress: bool = True,
) -> float:
    """SegF1's threshold of a class: its validation/good images (`dataset`, as `batches`)
    predicted exactly as its test images are (this predictor, preprocessing, tiling and k-shot
    memory), their maps streamed into `ValidationThreshold`."""
    if isinstance(predictor, NativePredictor):  # maps at each image's own resolution
        capacity = 0
        for record in dataset.records:
            with Image.open(dataset.root / record["image_path"]) as image:
                capacity += image.width * image.height
        threshold = ValidationThreshold(DEFAULT_SEG_PERCENTILE, capacity)
        predict_class_native(
            predictor, batches, prompt_name, NormalMaps(threshold), show_progress=show_progress
        )
    else:
        capacity = len(dataset) * predictor.preprocessing.size**2
        threshold = ValidationThreshold(DEFAULT_SEG_PERCENTILE, capacity)
        predict_class(
            predictor, batches, prompt_name, NormalMaps(threshold), show_progress=show_progress
        )
    return threshold.compute()


@torch.no_grad()
def predict_class(
    predictor: Predictor,
    batches: Iterable[dict],
    prompt_name: str,
    evaluator: ClassEvaluator | NormalMaps,
    keep_maps: bool = False,
    show_progress: bool = True,
    sink: MapSink | None = None,
) -> ClassOutputs:
    """Predict a class batch by batch, streaming maps `[B, S, S]`, masks and valid masks into
    `evaluator` (letterbox padding is never scored); with `keep_maps` the maps, masks and
    pixels are also kept (panels); `sink` gets each map at its image's full resolution."""
    kept: dict[str, list[np.ndarray]] = {"maps": [], "masks": [], "pixels": []}
    scores, labels, paths, file_names, extrema = [], [], [], [], []
    for batch in progress(batches, show_progress, desc="batches", leave=False):
        images, valid = batch["image"], batch["valid_mask"]
        output = predictor.predict(images, [prompt_name] * len(images), valid)
        maps = output.anomaly_map.cpu().numpy().astype(np.float32, copy=False)
        masks = batch["mask"].numpy()
        evaluator.update(maps, masks, valid.numpy() if predictor.preprocessing.pads else None)
        extrema.append(MapExtrema.of(maps))
        if sink is not None:
            for anomaly_map, path, name in zip(
                maps, batch["image_path"], batch["file_name"], strict=True
            ):
                sink(name, full_resolution(predictor.preprocessing, anomaly_map, path))
        if keep_maps:
            kept["maps"].append(maps)
            kept["masks"].append(masks)
            kept["pixels"].append(predictor.preprocessing.to_pixels(images))
        scores.append(output.image_score.cpu().numpy())
        labels.append(batch["label"].numpy())
        paths.extend(batch["image_path"])
        file_names.extend(batch["file_name"])
    return ClassOutputs(
        det_scores=np.concatenate(scores),
        labels=np.concatenate(labels).astype(np.int64),
        extrema=MapExtrema.concatenate(extrema),
        paths=paths,
        file_names=file_names,
        **({name: np.concatenate(arrays) for name, arrays in kept.items()} if keep_maps else {}),
    )


@torch.no_grad()
def predict_class_native(
    predictor: NativePredictor,
    batches: Iterable[dict],
    prompt_name: str,
    evaluator: ClassEvaluator | NormalMaps,
    show_progress: bool = True,
    sink: MapSink | None = None,
) -> ClassOutputs:
    """`predict_class` at native resolution: each native image `[H, W, 3]` becomes its map
    `[H, W]` (stitched from tiles, or resized from the input's), which streams into `evaluator`
    against its full-resolution mask (and `sink`) and is dropped."""
    scores, labels, paths, file_names, extrema = [], [], [], [], []
    for batch in progress(batches, show_progress, desc="images", leave=False):
        for pixels, mask, name in zip(
            batch["image"], batch["mask"], batch["file_name"], strict=True
        ):
            output = predictor.predict_image(Image.fromarray(pixels.numpy()), prompt_name)
            maps = output.anomaly_map[None]  # [1, H, W]
            evaluator.update(maps, mask[None].numpy())
            extrema.append(MapExtrema.of(maps))
            if sink is not None:
                sink(name, output.anomaly_map)
            scores.append(output.image_score)
        labels.append(batch["label"].numpy())
        paths.extend(batch["image_path"])
        file_names.extend(batch["file_name"])
    return ClassOutputs(
        det_scores=np.asarray(scores, dtype=np.float32),
        labels=np.concatenate(labels).astype(np.int64),
        extrema=MapExtrema.concatenate(extrema),
        paths=paths,
        file_names=file_names,
    )


def class_metrics(
    predictor: Predictor | NativePredictor,
    batches: Iterable[dict],
    class_name: str,
    size: int,
    config: EvalConfig,
    info: DatasetInfo,
    panels: bool = False,
    support: dict[str, list[str]] | None = None,
    normal: tuple[TestDataset, Iterable[dict]] | None = None,
) -> ClassResult:
    """One class's metrics and image scores under one trained model (`size` test images);
    with `panels`, its panels are written.

    With `--k_shot` > 0 the predictor's support set holds k normal train-split images of the
    class while it is predicted and scored; their paths go into `support`. `normal` (MVTec AD
    2: the class's validation/good images and their batches) gives SegF1's threshold first,
    which also binarises the `--submission` maps; `--submission` and `--save_maps` get each
    full-resolution map as it is predicted.
    """
    is_native = isinstance(predictor, NativePredictor)
    capacity = None if is_native else size * predictor.preprocessing.size**2  # native: any sizes
    if config.k_shot > 0:
        set_support(predictor, class_name, config, info, support)
    try:
        prompt_name = real_name(info, class_name)
        threshold = None
        if normal is not None:
            threshold = validation_threshold(predictor, *normal, prompt_name, config.progress)
            logger.info("%s: SegF1 threshold %.6g from validation/good", class_name, threshold)
        evaluator = ClassEvaluator(
            config.columns, config.fpr_limit, config.pro_variant, capacity, class_name, threshold
        )
        sink = map_sink(config, threshold)
        if is_native:
            outputs = predict_class_native(
                predictor, batches, prompt_name, evaluator, config.progress, sink
            )
        else:
            outputs = predict_class(
                predictor, batches, prompt_name, evaluator, panels, config.progress, sink
            )
        image_scores = predictor.table_image_scores(outputs.extrema, outputs.det_scores)
    finally:
        if config.k_shot > 0:
            predictor.set_support(None)
    metrics = evaluator.compute(image_scores, outputs.labels)
    if panels:
        write_panels(outputs, class_name, config, predictor)
    images = [
        {"file": name, "label": int(label), "score": float(score), "table_score": float(table)}
        for name, label, score, table in zip(
            outputs.file_names, outputs.labels, outputs.det_scores, image_scores, strict=True
        )
    ]
    return ClassResult(metrics, images, threshold)


def map_sink(config: EvalConfig, threshold: float | None) -> MapSink | None:
    """Where full-resolution maps go: the submission (binarised at `threshold`), the
    `--save_maps` folder, or nowhere."""
    if config.submission is not None:
        root, folder = config.data_root, config.submission
        return lambda path, anomaly_map: write_anomaly_map(
            folder, root, path, anomaly_map, threshold
        )
    if config.save_maps is not None:
        folder = config.save_maps
        return lambda path, anomaly_map: write_float16_tiff(
            folder / safe_relative(path).with_suffix(".tiff"), anomaly_map, path
        )
    return None


def set_support(
    predictor: AnomalyPredictor | NativePredictor,
    class_name: str,
    config: EvalConfig,
    info: DatasetInfo,
    support: dict[str, list[str]] | None,
) -> None:
    """Draw the class's k-shot support set (seeded) and hand it to the predictor, prepared as
    the test images are (tiled: every tile of each support image)."""
    root = config.data_root
    paths = draw_support(info, root, class_name, config.k_shot, config.support_seed)
    if support is not None:
        support[class_name] = [Path(path).relative_to(root).as_posix() for path in paths]
    if isinstance(predictor, NativePredictor):
        predictor.set_support(predictor.support_images(paths))
    else:
        predictor.set_support(load_images(paths, predictor.preprocessing))


def write_panels(
    outputs: ClassOutputs, class_name: str, config: EvalConfig, predictor: Predictor
) -> None:
    """[image | ground truth | heat map] per image; the map min-max normalised over the class.
    At the model's size the image is the loader's (not decoded again); at the original size
    the file is read once more (the full resolution is not held)."""
    maps = outputs.maps
    low, high = float(outputs.extrema.minima.min()), float(outputs.extrema.maxima.max())
    heat = (maps - low) / (high - low) if high > low else np.zeros_like(maps)
    folder = config.output_folder() / "visualization" / safe_name(config.dataset)
    folder = folder / safe_name(class_name)
    preprocessing = predictor.preprocessing
    for index, (path, file_name) in enumerate(zip(outputs.paths, outputs.file_names, strict=True)):
        mask = outputs.masks[index]
        if config.vis_size == "model":
            picture = outputs.pixels[index]
        else:
            image = preprocessing.seen_region(read_image(path, preprocessing.pad_color))
            mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST))
            picture = np.asarray(image)
        name = safe_name(Path(file_name).with_suffix("").as_posix() + ".png")
        save_panels(folder / name, picture, heat[index], mask=mask)


def variant(config: EvalConfig, k_shot: int, backend: str = "torch") -> dict[str, str]:
    """What tells one evaluation of a checkpoint on a data set from another: MVTec AD 2's split
    (other than test_public), the k-shot memory, tiling, the backend. {file-name tag: what it
    means}; empty for the zero-shot, whole-image torch evaluation."""
    tags = {}
    if config.dataset == "MVTecAD2" and config.split != "test_public":
        tags[config.split] = f"split {config.split}"
    if k_shot:
        tags[f"{k_shot}shot"] = f"{k_shot}-shot"
    if config.tile:
        tags[f"tile{config.tile}"] = f"tiles of {config.tile} px"
    elif config.native != (config.dataset == "MVTecAD2"):  # not the data set's default
        tags[config.metric_resolution] = f"metrics at {config.metric_resolution} resolution"
    if backend != "torch":
        tags[backend] = f"backend {backend}"
    return tags


def results_stem(dataset: str, checkpoint: Path, model: str, tags: Iterable[str] = ()) -> str:
    """`results_<dataset>` for the evaluated checkpoint of a run (`<stem>.pth`, or the kept
    `<stem>_best.pth`), else with the file's stem appended; then the `variant` tags, so a k-shot,
    tiled or exported evaluation never overwrites the zero-shot table."""
    parts = [f"results_{dataset}"]
    if checkpoint.stem not in (checkpoint_stem(model), f"{checkpoint_stem(model)}_best"):
        parts.append(checkpoint.stem)
    return "_".join([*parts, *tags])


def evaluate(config: EvalConfig, overrides: dict[str, Any]) -> list[EvaluatedFile]:
    """Evaluate the configured checkpoints (`overrides`: the model settings given) and write
    each one's results files; returns them in order."""
    config = config.resolve()
    device = resolve_device(config.device)
    seed_everything(config.seed)
    info, records = _test_records(config)
    model_name, files = checkpoint_files(config)
    trust = config.trust_checkpoint
    _, model, payload = load_trained_model(
        files[0], device, model_name, overrides, config.dataset, trust
    )
    payloads = {files[0]: payload}
    sources = {files[0]: model.weight_sources}
    predictor = AnomalyPredictor(model, info.domain, config.amp, config.k_shot)
    preprocessing = dataclasses.replace(predictor.preprocessing, resize_masks=config.resize_masks)
    datasets = build_test_datasets(records, config.data_root, preprocessing, config.native)
    normal_sets = validation_datasets(config, preprocessing, datasets)
    workers = loader_workers(config.num_workers, device, evaluation=True)
    log_outputs(config)
    # Several checkpoints: class by class, each class decoded once and scored by every one.
    cache = len(files) > 1
    logger.info(
        "evaluating %s on %s: %s%s",
        model_name,
        config.dataset,
        ", ".join(path.name for path in files),
        " (each class decoded once and held for every checkpoint)" if cache else "",
    )
    per_file: dict[Path, dict[str, ClassResult]] = {path: {} for path in files}
    supports: dict[Path, dict[str, list[str]]] = {path: {} for path in files}
    # native: one image per loader batch (tiled: --batch_size tiles per forward)
    groups = class_batches(datasets, 1 if config.native else config.batch_size, workers, device)
    bars = config.progress
    for class_name, batches in progress(groups, bars, total=len(datasets), desc="classes"):
        normal = normal_images(normal_sets, class_name, config, workers, cache)
        if cache:  # decoded once, scored by every file
            batches = list(progress(batches, bars, desc="loading", leave=False))
        for path in files:
            if cache:  # the same run's next file: same architecture, its weights
                payloads[path] = model.load_trained(path, trust=trust)
                sources[path] = model.weight_sources
            predictor = AnomalyPredictor(model, info.domain, config.amp, config.k_shot)
            per_file[path][class_name] = class_metrics(
                at_resolution(predictor, config, config.batch_size, config.native),
                batches,
                class_name,
                len(datasets[class_name]),
                config,
                info,
                panels=config.visualize and path == files[-1],
                support=supports[path],
                normal=normal,
            )
        del batches, normal
    settings = to_mapping(model.config)
    tags = variant(config, config.k_shot)
    results = []
    for path in files:
        payload, support = payloads[path], supports[path]
        per_class = {name: result.metrics for name, result in per_file[path].items()}
        images = {name: result.images for name, result in per_file[path].items()}
        meta = {
            "dataset": config.dataset,
            "model": model_name,
            "checkpoint": str(path),
            "epoch": payload.get("epoch"),
            "train_seed": (payload.get("config") or {}).get("seed"),
            **sources[path],
            **{
                field.name: settings[field.name]
                for field in settings_of(type(model.config), (TEST,))
                if field.name not in model.config.preprocessing_settings  # in "preprocessing"
            },
            "model_settings": settings,
            "smoothing": model.smoothing,
            **scoring_meta(config, predictor, preprocessing),
            "k_shot": config.k_shot,
            "support_seed": config.support_seed if config.k_shot > 0 else None,
            "support": support,
            "variant": ", ".join(tags.values()) or "zero-shot, whole image, torch",
            **threshold_meta(config, per_file[path]),
        }
        result = EvaluatedFile(path, payload.get("epoch"), per_class, images, meta)
        write_evaluated(config, results_stem(config.dataset, path, model_name, tags), result)
        results.append(result)
    report_submission(config)
    return results


def validation_datasets(
    config: EvalConfig, preprocessing: Any, datasets: dict[str, TestDataset]
) -> dict[str, TestDataset]:
    """Per class of the test `datasets`, its MVTec AD 2 validation/good images read as the test
    images are (SegF1's threshold, the submission's binarisation); empty when not needed."""
    if not config.needs_threshold:
        return {}
    info = mvtec_ad2_info("validation")
    records = load_test_records(info, config.data_root, config.metadata_dir)
    normal = build_test_datasets(records, config.data_root, preprocessing, config.native)
    missing = [name for name in datasets if name not in normal]
    if missing:
        raise DataError(
            f"{config.data_root} has no validation/good images of {', '.join(missing)}; SegF1's "
            "threshold comes from them: restore the validation split of the MVTec AD 2 download"
        )
    return normal


def normal_images(
    normal_sets: dict[str, TestDataset],
    class_name: str,
    config: EvalConfig,
    workers: int,
    cache: bool = False,
) -> tuple[TestDataset, Iterable[dict]] | None:
    """A class's validation/good images and their batches (as the test images are batched;
    held with `cache`, for several checkpoints); None without thresholds."""
    if class_name not in normal_sets:
        return None
    dataset = normal_sets[class_name]
    loader = DataLoader(
        dataset,
        batch_size=1 if config.native else config.batch_size,
        num_workers=workers,
        collate_fn=collate_test,
    )
    return dataset, list(loader) if cache else loader


def log_outputs(config: EvalConfig) -> None:
    """Say up front what an unlabelled split yields: maps, no metric."""
    if config.unlabelled:
        logger.info(
            "--split %s is unlabelled: no metric is computed; each image's full-resolution map "
            "goes into the submission %s",
            config.split,
            config.submission,
        )


def threshold_meta(config: EvalConfig, per_class: dict[str, ClassResult]) -> dict[str, Any]:
    """What a results file records of SegF1's thresholds and the maps written."""
    meta: dict[str, Any] = {}
    if config.needs_threshold:
        meta["seg_thresholds"] = {name: result.threshold for name, result in per_class.items()}
        meta["seg_threshold_rule"] = (
            f"percentile {DEFAULT_SEG_PERCENTILE:g} of each class's validation/good pixel scores"
        )
    if config.submission is not None:
        meta["submission"] = str(config.submission)
    if config.save_maps is not None:
        meta["save_maps"] = str(config.save_maps)
    return meta


def report_submission(config: EvalConfig) -> None:
    """Check the submission tree once this split's maps are written: the image count when both
    private splits are there, else the one-line reason (typically the other split, still to be
    run into the same folder)."""
    if config.submission is None:
        return
    try:
        count = check_submission(config.submission, config.data_root)
    except DataError as error:
        logger.warning("submission not complete yet: %s", error)
        return
    logger.info("submission %s checked: %d images, ready for upload", config.submission, count)


def scoring_meta(config: EvalConfig, predictor: Predictor, preprocessing: Any) -> dict[str, Any]:
    """What every results file records of how its images were scored."""
    return {
        "domain": predictor.domain,
        "amp": predictor.amp,
        "resolution": preprocessing.size,
        "preprocessing": preprocessing.to_dict(),
        "tiling": config.tiling(),
        "metric_resolution": config.metric_resolution,
        "pro_variant": config.pro_variant,
        "fpr_limit": config.fpr_limit,
        "config": to_mapping(config),
    }


def write_evaluated(config: EvalConfig, stem: str, result: EvaluatedFile) -> None:
    """`<stem>.{json,csv,md}` of one evaluated checkpoint or export in the output folder."""
    write_results(
        config.output_folder(),
        stem,
        result.per_class,
        config.columns,
        result.meta,
        undefined=config.undefined_metric,
        decimals=config.decimals,
        images=result.images,
    )


def _test_records(config: EvalConfig) -> tuple[DatasetInfo, list[dict]]:
    """The data set and its test records (the synthetic set generated on first use)."""
    info = config.dataset_info()
    if config.dataset == "Synthetic":
        ensure_synthetic(config.data_root)
    records = load_test_records(info, config.data_root, config.metadata_dir)
    if config.resize_masks:
        log_resized_masks(records, config.data_root)
    return info, records


def evaluate_export(config: EvalConfig, predictor: Any) -> EvaluatedFile:
    """Evaluate an exported graph (`--backend onnxruntime|openvino --export DIR`; `predictor`
    its `utils.deploy.export.ExportedPredictor`, which the caller builds) with the same loop,
    metrics and tables as a checkpoint: its preprocessing, classes, domain and k-shot memory are the
    export's; writes `results_<dataset>_<backend>`."""
    config = config.resolve()
    if config.k_shot not in (0, predictor.k_shot):
        raise ConfigError(
            f"--k_shot {config.k_shot}: the export's memory is {predictor.k_shot}-shot, baked in "
            f"at export; leave --k_shot out, or export again with --k_shot {config.k_shot}"
        )
    seed_everything(config.seed)
    info, records = _test_records(config)
    if info.domain != predictor.domain:
        raise ConfigError(
            f"{config.dataset} is {info.domain} but the export was traced for {predictor.domain}; "
            f"export again with --domain {info.domain}"
        )
    predictor.class_index(
        [real_name(info, name) for name in dict.fromkeys(r["class_name"] for r in records)]
    )
    preprocessing = dataclasses.replace(predictor.preprocessing, resize_masks=config.resize_masks)
    datasets = build_test_datasets(records, config.data_root, preprocessing, config.native)
    normal_sets = validation_datasets(config, preprocessing, datasets)
    workers = loader_workers(config.num_workers, predictor.device, evaluation=True)
    log_outputs(config)
    logger.info(
        "evaluating the %s %s export %s on %s with %s",
        predictor.precision,
        predictor.model_name,
        config.export,
        config.dataset,
        config.backend,
    )
    scoring = dataclasses.replace(config, k_shot=0)  # the memory is in the graph
    per_class, images, results = {}, {}, {}
    groups = class_batches(
        datasets, 1 if config.native else config.batch_size, workers, predictor.device
    )
    for class_name, batches in progress(
        groups, config.progress, total=len(datasets), desc="classes"
    ):
        result = class_metrics(
            at_resolution(predictor, config, config.batch_size, config.native),
            batches,
            class_name,
            len(datasets[class_name]),
            scoring,
            info,
            panels=config.visualize,
            normal=normal_images(normal_sets, class_name, config, workers),
        )
        per_class[class_name], images[class_name] = result.metrics, result.images
        results[class_name] = result
    exported = predictor.info
    meta = {
        "dataset": config.dataset,
        "model": predictor.model_name,
        "backend": config.backend,
        "export": str(config.export),
        "precision": predictor.precision,
        "export_id": exported["export_id"],
        "checkpoint": exported["model"]["checkpoint"],
        "epoch": exported["model"].get("epoch"),
        "model_settings": exported["model"].get("config"),
        **scoring_meta(config, predictor, preprocessing),
        "k_shot": predictor.k_shot,
        "support": exported.get("support"),
        **threshold_meta(config, results),
    }
    tags = variant(config, predictor.k_shot, config.backend)
    meta["variant"] = ", ".join(tags.values())
    epoch = exported["model"].get("epoch")
    result = EvaluatedFile(Path(config.export), epoch, per_class, images, meta)
    write_evaluated(config, "_".join([f"results_{config.dataset}", *tags]), result)
    report_submission(config)
    return result
