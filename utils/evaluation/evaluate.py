"""The evaluation loop of test.py: trained checkpoints, or an export's graph, on a labelled data
set, class by class, then the macro mean, written as results_<dataset>.{json,csv,md}.

The model source (`utils.inference.source`: a checkpoint, `--model` picking one when a folder
holds several, or with `--backend onnxruntime|openvino` an export) is opened as a predictor, and
every map comes through the one prediction stream (`utils.inference.stream.predict_images`),
with the source's own preprocessing. Each model's paper protocol gives the table's image score;
AA-CLIP's (its `test.py`): maps summed over levels, per-class min-max of maps and detection
scores, image score `0.5 * map max + 0.5 * det` (industrial) or the map max (medical). That
min-max is transductive: fine for paper tables, not for deployment (predict.py).

Classes stream through one loader: a class's maps go batch by batch into its metrics, so no
full-size map of a class is held unless panels are asked for; with several checkpoints
(`--all_epochs`) a class is decoded once and scored by each of them. At native resolution
(`--metric_resolution native`: MVTec AD 2's default, and `--tile`'s) the images and masks are
read at their own resolution, one image per batch, and each image's map at that resolution
(`utils.inference.resolution`: whole, resized back from the input; or stitched from tiles)
streams into the metrics against the full-resolution mask.

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
from torch.utils.data import ConcatDataset, DataLoader

from datasets.anomaly import TestDataset, build_test_datasets
from datasets.catalog import (
    MVTEC_AD2_PRIVATE_SPLITS,
    DataConfig,
    DatasetInfo,
    mvtec_ad2_info,
    real_name,
)
from datasets.items import ItemBatch, collate_items
from datasets.metadata import load_test_records, log_resized_masks
from datasets.preprocessing import read_image
from datasets.synthetic import ensure_synthetic
from datasets.tiling import TileConfig
from models.base import MapExtrema
from models.registry import MODELS, checkpoint_stem, find_checkpoint
from utils.core.checkpoint import TRAIN_LOCK, held
from utils.core.config import RUN, setting, to_mapping
from utils.core.errors import CheckpointError, ConfigError, DataError
from utils.core.names import safe_name, safe_relative
from utils.core.runtime import (
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
from utils.inference.predictor import Predictor
from utils.inference.resolution import at_resolution
from utils.inference.source import ModelSource, open_predictor
from utils.inference.stream import predict_images
from utils.inference.support import SupportConfig, set_class_support, support_paths

logger = logging.getLogger("test")

METRIC_SETS = {"full": COLUMNS_FULL, "official": COLUMNS_OFFICIAL, "mvtec_ad2": COLUMNS_MVTEC_AD2}
# A map at an image's full resolution, handed over image by image: (record path, map [H, W]).
MapSink = Callable[[str, np.ndarray], None]


@dataclasses.dataclass
class EvalConfig(TileConfig, SupportConfig, ModelSource, RuntimeConfig, DataConfig):
    """test.py: which checkpoints, on which data, with which metrics and outputs."""

    save_path: Path = setting(
        Path("ckpt/aaclip"), "run folder whose checkpoints are evaluated", kind=RUN
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
        if self.graph and self.all_epochs:
            raise ConfigError(
                "--all_epochs evaluates a run's checkpoint files; an export is one graph: drop "
                "--all_epochs, or evaluate the run with --backend torch"
            )
        self.check_support()
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
        """Where results, panels and test.log go: --results_dir, else the checkpoint's folder
        (an export's own)."""
        if self.results_dir is not None:
            return self.results_dir
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


def checkpoint_files(config: EvalConfig) -> tuple[str | None, list[Path]]:
    """(model name, files to evaluate); every per-epoch file in numeric order for --all_epochs;
    an export's folder as it is (its model.json names the model)."""
    trust = config.trust_checkpoint
    if config.graph:
        return None, [config.checkpoint or config.save_path]
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


def class_batches(
    datasets: dict[str, TestDataset], batch_size: int, num_workers: int, device: torch.device
) -> Iterator[tuple[str, Iterator[ItemBatch]]]:
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
        collate_fn=collate_items,
    )
    return itertools.groupby(loader, key=lambda batch: batch.items[0].class_name)


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
    predictor: Predictor,
    dataset: TestDataset,
    batches: Iterable[ItemBatch],
    prompt_name: str,
    show_progress: bool = True,
) -> float:
    """SegF1's threshold of a class: its validation/good images (`dataset`, as `batches`)
    predicted exactly as its test images are (this predictor, preprocessing, tiling and k-shot
    memory), their maps streamed into `ValidationThreshold`."""
    if predictor.native:  # maps at each image's own resolution
        capacity = 0
        for record in dataset.records:
            with Image.open(dataset.root / record["image_path"]) as image:
                capacity += image.width * image.height
    else:
        capacity = len(dataset) * predictor.preprocessing.size**2
    threshold = ValidationThreshold(DEFAULT_SEG_PERCENTILE, capacity)
    predict_class(
        predictor, batches, prompt_name, NormalMaps(threshold), show_progress=show_progress
    )
    return threshold.compute()


def predict_class(
    predictor: Predictor,
    batches: Iterable[ItemBatch],
    prompt_name: str,
    evaluator: ClassEvaluator | NormalMaps,
    keep_maps: bool = False,
    show_progress: bool = True,
    sink: MapSink | None = None,
) -> ClassOutputs:
    """Predict a class through the one stream (`predict_images`), each map (`[S, S]` at the model
    input, `[H, W]` at native resolution) with its mask and valid mask streamed into `evaluator`
    (letterbox padding is never scored) and dropped; with `keep_maps` the model-input maps,
    masks and pixels are kept (panels); `sink` gets each map at its image's full resolution."""
    kept: dict[str, list[np.ndarray]] = {"maps": [], "masks": [], "pixels": []}
    scores, labels, paths, file_names, extrema = [], [], [], [], []
    preprocessing = predictor.preprocessing
    for result in predict_images(predictor, batches, prompt_name, show_progress):
        item = result.item
        maps = result.anomaly_map[None]  # [1, h, w]
        masks = item.mask.bool().numpy()  # [1, h, w]
        evaluator.update(maps, masks, None if result.valid is None else result.valid[None])
        extrema.append(MapExtrema.of(maps))
        if sink is not None:
            native = predictor.native  # already at the image's resolution
            full = maps[0] if native else full_resolution(preprocessing, maps[0], item.path)
            sink(item.file, full)
        if keep_maps:
            kept["maps"].append(maps)
            kept["masks"].append(masks)
            kept["pixels"].append(preprocessing.to_pixels(result.image[None]))
        scores.append(result.image_score)
        labels.append(item.label)
        paths.append(item.path)
        file_names.append(item.file)
    return ClassOutputs(
        det_scores=np.asarray(scores, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        extrema=MapExtrema.concatenate(extrema),
        paths=paths,
        file_names=file_names,
        **({name: np.concatenate(arrays) for name, arrays in kept.items()} if keep_maps else {}),
    )


def class_metrics(
    predictor: Predictor,
    batches: Iterable[ItemBatch],
    class_name: str,
    size: int,
    config: EvalConfig,
    info: DatasetInfo,
    panels: bool = False,
    support: dict[str, list[str]] | None = None,
    normal: tuple[TestDataset, Iterable[ItemBatch]] | None = None,
    several: bool = True,
) -> ClassResult:
    """One class's metrics and image scores under one trained model (`size` test images);
    with `panels`, its panels are written.

    A predictor that needs support (`--k_shot` > 0 on a checkpoint) holds k normal images of the
    class while it is predicted and scored (from `--support_dir`, its `<class>/` folder when the
    data set has `several` classes, or the train split); their paths go into `support`.
    `normal` (MVTec AD 2: the class's validation/good images and their batches) gives SegF1's
    threshold first, which also binarises the `--submission` maps; `--submission` and
    `--save_maps` get each full-resolution map as it is predicted.
    """
    # native: maps of any size, so no preallocated pixel buffer
    capacity = None if predictor.native else size * predictor.preprocessing.size**2
    if predictor.needs_support:
        paths = support_paths(config, class_name, several, info, config.data_root)
        if support is not None:
            support[class_name] = [_relative(path, config.data_root) for path in paths]
        set_class_support(predictor, paths)
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
        outputs = predict_class(
            predictor, batches, prompt_name, evaluator, panels, config.progress, sink
        )
        image_scores = predictor.table_image_scores(outputs.extrema, outputs.det_scores)
    finally:
        if predictor.needs_support:
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


def _relative(path: Path, root: Path) -> str:
    """A support file as results record it: relative to the data root when under it."""
    path = Path(path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


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


def results_stem(
    dataset: str, checkpoint: Path | None, model: str, tags: Iterable[str] = ()
) -> str:
    """`results_<dataset>` for the evaluated checkpoint of a run (`<stem>.pth`, or the kept
    `<stem>_best.pth`) or an export (`checkpoint` None), else with the file's stem appended; then
    the `variant` tags, so a k-shot, tiled or exported evaluation never overwrites the zero-shot
    table."""
    parts = [f"results_{dataset}"]
    main = (checkpoint_stem(model), f"{checkpoint_stem(model)}_best")
    if checkpoint is not None and checkpoint.stem not in main:
        parts.append(checkpoint.stem)
    return "_".join([*parts, *tags])


def evaluate(config: EvalConfig, overrides: dict[str, Any]) -> list[EvaluatedFile]:
    """Evaluate the configured checkpoints, or an export's graph (`overrides`: the model
    settings given), and write each one's results files; returns them in order."""
    config = config.resolve()
    device = resolve_device(config.device)
    seed_everything(config.seed)
    info, records = _test_records(config)
    model_name, files = checkpoint_files(config)
    trust = config.trust_checkpoint
    opened = open_predictor(
        dataclasses.replace(config, model=model_name),
        overrides,
        path=files[0],
        device=device,
        domain=info.domain,
        domain_flag=f"--dataset {config.dataset}",
        amp=config.amp,
        k_shot=config.k_shot,
        dataset=config.dataset,
        trust=trust,
    )
    opened.predictor.check_classes(
        [real_name(info, name) for name in dict.fromkeys(r["class_name"] for r in records)]
    )
    k_shot = opened.predictor.k_shot
    sources = {files[0]: opened.describe()}
    preprocessing = dataclasses.replace(
        opened.predictor.preprocessing, resize_masks=config.resize_masks
    )
    datasets = build_test_datasets(records, config.data_root, preprocessing, config.native)
    normal_sets = validation_datasets(config, preprocessing, datasets)
    workers = loader_workers(config.num_workers, opened.predictor.device, evaluation=True)
    log_outputs(config)
    # Several checkpoints: class by class, each class decoded once and scored by every one.
    cache = len(files) > 1
    logger.info(
        "evaluating %s (%s) on %s: %s%s",
        opened.name,
        config.backend,
        config.dataset,
        ", ".join(path.name for path in files),
        " (each class decoded once and held for every checkpoint)" if cache else "",
    )
    per_file: dict[Path, dict[str, ClassResult]] = {path: {} for path in files}
    supports: dict[Path, dict[str, list[str]]] = {path: {} for path in files}
    # native: one image per loader batch (tiled: --batch_size tiles per forward)
    batch_size = 1 if config.native else config.batch_size
    groups = class_batches(datasets, batch_size, workers, opened.predictor.device)
    bars = config.progress
    for class_name, batches in progress(groups, bars, total=len(datasets), desc="classes"):
        normal = normal_images(normal_sets, class_name, config, workers, cache)
        if cache:  # decoded once, scored by every file
            batches = list(progress(batches, bars, desc="loading", leave=False))
        for path in files:
            if cache:  # the same run's next file: same architecture, its weights
                opened.load(path, trust)
                sources[path] = opened.describe()
            per_file[path][class_name] = class_metrics(
                at_resolution(opened.predictor, config, config.batch_size, config.native),
                batches,
                class_name,
                len(datasets[class_name]),
                config,
                info,
                panels=config.visualize and path == files[-1],
                support=supports[path],
                normal=normal,
                several=len(datasets) > 1,
            )
        del batches, normal
    tags = variant(config, k_shot, config.backend)
    results = []
    for path in files:
        described = sources[path]
        per_class = {name: result.metrics for name, result in per_file[path].items()}
        images = {name: result.images for name, result in per_file[path].items()}
        meta = {
            "dataset": config.dataset,
            **described,
            **scoring_meta(config, opened.predictor, preprocessing),
            "k_shot": k_shot,
            "support_seed": config.support_seed if opened.predictor.needs_support else None,
            "support": described.get("support", supports[path]),  # an export: its own
            "variant": ", ".join(tags.values()) or "zero-shot, whole image, torch",
            **threshold_meta(config, per_file[path]),
        }
        result = EvaluatedFile(path, described["epoch"], per_class, images, meta)
        checkpoint = None if config.graph else path
        write_evaluated(config, results_stem(config.dataset, checkpoint, opened.name, tags), result)
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
) -> tuple[TestDataset, Iterable[ItemBatch]] | None:
    """A class's validation/good images and their batches (as the test images are batched;
    held with `cache`, for several checkpoints); None without thresholds."""
    if class_name not in normal_sets:
        return None
    dataset = normal_sets[class_name]
    loader = DataLoader(
        dataset,
        batch_size=1 if config.native else config.batch_size,
        num_workers=workers,
        collate_fn=collate_items,
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
