"""The evaluation loop of test.py: trained checkpoints on a labelled data set, class by class,
then the macro mean, written as results_<dataset>.{json,csv,md}.

The model is read from the checkpoint (`--model` picks one when a folder holds several) and
scores through its predictor, with its own preprocessing. Each model's paper protocol gives the
image score; AA-CLIP's (spec aaclip.md §14): maps summed over levels, per-class min-max of maps
and detection scores, image score `0.5 * map max + 0.5 * det` (industrial) or the map max
(medical). That min-max is transductive: fine for paper tables, not for deployment (predict.py).

Classes stream through one loader: a class's maps go batch by batch into its metrics, so no
full-size map of a class is held unless panels are asked for; with several checkpoints
(`--all_epochs`) a class is decoded once and scored by each of them. With `--tile` the images
and masks are read at their own resolution and each image is scored by tiles
(`models.tiling`): its stitched map streams into the metrics against the full-resolution mask.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, default_collate

from datasets.anomaly import TestDataset, build_test_datasets
from datasets.catalog import DataConfig, DatasetInfo, real_name
from datasets.metadata import load_test_records, log_resized_masks
from datasets.preprocessing import read_image
from datasets.support import draw_support, load_images
from datasets.synthetic import ensure_synthetic
from datasets.tiling import TileConfig
from models.base import MapExtrema
from models.predictor import AnomalyPredictor, Predictor
from models.registry import MODELS, checkpoint_stem, find_checkpoint, load_trained_model
from models.tiling import TiledPredictor, tiled
from utils.core.config import RUN, TEST, setting, settings_of, to_mapping
from utils.core.errors import CheckpointError, ConfigError
from utils.core.runtime import (
    RuntimeConfig,
    loader_workers,
    progress,
    resolve_device,
    seed_everything,
)
from utils.evaluation.metrics import COLUMNS_FULL, COLUMNS_OFFICIAL, PRO_VARIANTS, ClassEvaluator
from utils.evaluation.report import write_results
from utils.evaluation.visualize import save_panels

logger = logging.getLogger("test")


@dataclasses.dataclass
class EvalConfig(TileConfig, RuntimeConfig, DataConfig):
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
    metrics: str = setting(
        "full",
        "full: 7 columns; official: AA-CLIP's 4 columns, undefined as 0, 2 decimals of rounded "
        "values",
        kind=RUN,
        choices=("full", "official"),
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

    def resolve(self) -> EvalConfig:
        """The settings left unset filled in: data root, undefined-metric rule, decimals."""
        if self.tile and self.visualize:
            raise ConfigError(
                "--visualize draws panels at the model input; with --tile the maps are at each "
                "image's resolution: leave one of them out"
            )
        official = self.metrics == "official"
        return dataclasses.replace(
            self,
            data_root=self.root(),
            undefined_metric=self.undefined_metric or ("zero" if official else "nan"),
            decimals=self.decimals if self.decimals is not None else (2 if official else 1),
        )

    @property
    def columns(self) -> list[str]:
        return COLUMNS_OFFICIAL if self.metrics == "official" else COLUMNS_FULL

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
            return model, sorted(files, key=lambda path: int(epoch_file.fullmatch(path.name)[1]))
    raise CheckpointError(f"no per-epoch checkpoints in {config.save_path}; train first")


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


@torch.no_grad()
def predict_class(
    predictor: Predictor,
    batches: Iterable[dict],
    prompt_name: str,
    evaluator: ClassEvaluator,
    keep_maps: bool = False,
    show_progress: bool = True,
) -> ClassOutputs:
    """Predict a class batch by batch, streaming maps `[B, S, S]`, masks and valid masks into
    `evaluator` (letterbox padding is never scored); with `keep_maps` the maps, masks and
    pixels are also kept (panels)."""
    kept: dict[str, list[np.ndarray]] = {"maps": [], "masks": [], "pixels": []}
    scores, labels, paths, file_names, extrema = [], [], [], [], []
    for batch in progress(batches, show_progress, desc="batches", leave=False):
        images, valid = batch["image"], batch["valid_mask"]
        output = predictor.predict(images, [prompt_name] * len(images), valid)
        maps = output.anomaly_map.cpu().numpy().astype(np.float32, copy=False)
        masks = batch["mask"].numpy()
        evaluator.update(maps, masks, valid.numpy() if predictor.preprocessing.pads else None)
        extrema.append(MapExtrema.of(maps))
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
def predict_class_tiled(
    predictor: TiledPredictor,
    batches: Iterable[dict],
    prompt_name: str,
    evaluator: ClassEvaluator,
    show_progress: bool = True,
) -> ClassOutputs:
    """`predict_class` by tiles: each native image `[H, W, 3]` becomes its stitched map
    `[H, W]`, which streams into `evaluator` against its full-resolution mask and is dropped."""
    scores, labels, paths, file_names, extrema = [], [], [], [], []
    for batch in progress(batches, show_progress, desc="images", leave=False):
        for pixels, mask in zip(batch["image"], batch["mask"], strict=True):
            output = predictor.predict_image(Image.fromarray(pixels.numpy()), prompt_name)
            maps = output.anomaly_map[None]  # [1, H, W]
            evaluator.update(maps, mask[None].numpy())
            extrema.append(MapExtrema.of(maps))
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
    predictor: Predictor | TiledPredictor,
    batches: Iterable[dict],
    class_name: str,
    size: int,
    config: EvalConfig,
    info: DatasetInfo,
    panels: bool = False,
    support: dict[str, list[str]] | None = None,
) -> ClassResult:
    """One class's metrics and image scores under one trained model (`size` test images);
    with `panels`, its panels are written.

    With `--k_shot` > 0 the predictor's support set holds k normal train-split images of the
    class while it is predicted and scored; their paths go into `support`.
    """
    is_tiled = isinstance(predictor, TiledPredictor)
    capacity = None if is_tiled else size * predictor.preprocessing.size**2  # tiled: any sizes
    evaluator = ClassEvaluator(
        config.columns, config.fpr_limit, config.pro_variant, capacity, class_name
    )
    if config.k_shot > 0:
        set_support(predictor, class_name, config, info, support)
    try:
        prompt_name = real_name(info, class_name)
        if is_tiled:
            outputs = predict_class_tiled(
                predictor, batches, prompt_name, evaluator, show_progress=config.progress
            )
        else:
            outputs = predict_class(
                predictor, batches, prompt_name, evaluator, panels, show_progress=config.progress
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
    return ClassResult(metrics, images)


def set_support(
    predictor: AnomalyPredictor | TiledPredictor,
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
    if isinstance(predictor, TiledPredictor):
        predictor.set_support(predictor.support_tiles(paths))
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
    folder = config.output_folder() / "visualization" / config.dataset / class_name
    preprocessing = predictor.preprocessing
    for index, (path, file_name) in enumerate(zip(outputs.paths, outputs.file_names, strict=True)):
        mask = outputs.masks[index]
        if config.vis_size == "model":
            picture = outputs.pixels[index]
        else:
            image = preprocessing.seen_region(read_image(path, preprocessing.pad_color))
            mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST))
            picture = np.asarray(image)
        name = Path(file_name).with_suffix("").as_posix().replace("/", "_") + ".png"
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
    datasets = build_test_datasets(records, config.data_root, preprocessing, config.tile > 0)
    workers = loader_workers(config.num_workers, device, evaluation=True)
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
    # tiled: one native image per loader batch, --batch_size tiles per forward
    groups = class_batches(datasets, 1 if config.tile else config.batch_size, workers, device)
    bars = config.progress
    for class_name, batches in progress(groups, bars, total=len(datasets), desc="classes"):
        if cache:  # decoded once, scored by every file
            batches = list(progress(batches, bars, desc="loading", leave=False))
        for path in files:
            if cache:  # the same run's next file: same architecture, its weights
                payloads[path] = model.load_trained(path, trust=trust)
                sources[path] = model.weight_sources
            predictor = AnomalyPredictor(model, info.domain, config.amp, config.k_shot)
            per_file[path][class_name] = class_metrics(
                tiled(predictor, config, config.batch_size),
                batches,
                class_name,
                len(datasets[class_name]),
                config,
                info,
                panels=config.visualize and path == files[-1],
                support=supports[path],
            )
        del batches
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
            },
            "model_settings": settings,
            "smoothing": model.smoothing,
            **scoring_meta(config, predictor, preprocessing),
            "k_shot": config.k_shot,
            "support_seed": config.support_seed if config.k_shot > 0 else None,
            "support": support,
            "variant": ", ".join(tags.values()) or "zero-shot, whole image, torch",
        }
        result = EvaluatedFile(path, payload.get("epoch"), per_class, images, meta)
        write_evaluated(config, results_stem(config.dataset, path, model_name, tags), result)
        results.append(result)
    return results


def scoring_meta(config: EvalConfig, predictor: Predictor, preprocessing: Any) -> dict[str, Any]:
    """What every results file records of how its images were scored."""
    return {
        "domain": predictor.domain,
        "amp": predictor.amp,
        "resolution": preprocessing.size,
        "preprocessing": preprocessing.to_dict(),
        "tiling": config.tiling(),
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
    datasets = build_test_datasets(records, config.data_root, preprocessing, config.tile > 0)
    workers = loader_workers(config.num_workers, predictor.device, evaluation=True)
    logger.info(
        "evaluating the %s %s export %s on %s with %s",
        predictor.precision,
        predictor.model_name,
        config.export,
        config.dataset,
        config.backend,
    )
    scoring = dataclasses.replace(config, k_shot=0)  # the memory is in the graph
    per_class, images = {}, {}
    groups = class_batches(
        datasets, 1 if config.tile else config.batch_size, workers, predictor.device
    )
    for class_name, batches in progress(
        groups, config.progress, total=len(datasets), desc="classes"
    ):
        result = class_metrics(
            tiled(predictor, config, config.batch_size),
            batches,
            class_name,
            len(datasets[class_name]),
            scoring,
            info,
            panels=config.visualize,
        )
        per_class[class_name], images[class_name] = result.metrics, result.images
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
    }
    tags = variant(config, predictor.k_shot, config.backend)
    meta["variant"] = ", ".join(tags.values())
    epoch = exported["model"].get("epoch")
    result = EvaluatedFile(Path(config.export), epoch, per_class, images, meta)
    write_evaluated(config, "_".join([f"results_{config.dataset}", *tags]), result)
    return result
