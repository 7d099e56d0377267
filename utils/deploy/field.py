"""The field engineer's commands (predict.py): calibrate thresholds on normal images, score
folders of new images, export a graph that runs without this code.

Every model in models.registry works through one predictor, which owns the model's
preprocessing (`--preprocess letterbox`, `--pad_color`, ... override it, and the override is
recorded). `calibrate` writes `<save path>/calibration.json` (or `<stem>.calibration.json` beside
a checkpoint file): thresholds, normal-score statistics, the model, its exact preprocessing, the
class, domain and overrides, and the data it saw (utils/deploy/calibration.py). `score` reuses the
calibration's class, domain and overrides unless flags override them, and writes `scores.csv`,
one heat-map overlay per image over the region the model saw, at the image's resolution up to
PREVIEW_SIDE px (`overlays/<folder>/<stem>_overlay.png`, padding cropped away), with `--labels`
`report.json` / `report.md` (no bare NaN: `null`), and the review page `index.html` with its
thumbnails (utils/deploy/review.py). An unreadable file (over the `--max_image_pixels` budget,
deleted meanwhile, corrupt) or one whose pictures cannot be written becomes a row with an error,
not a stopped run; rows reach `scores.partial.csv` as they are scored, so a run stopped by a full
disk keeps them; a scores.csv cell a spreadsheet would run as a formula gets a leading `'`. Names
that are not UTF-8 are written with their odd bytes as `\\xNN` (utils/core/names.py `printable`)
in every output, and labels.csv may name them either way. `export` writes a graph
(utils/deploy/export.py); `score --backend onnxruntime|openvino` scores with it, through the
preprocessing its model.json records.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.catalog import (
    CATALOG,
    DEFAULT_DOMAIN,
    DOMAINS,
    default_data_root,
    folder_info,
    get_dataset_info,
    real_name,
)
from datasets.folder import (
    PREVIEW_SIDE,
    FieldImage,
    ImageFolder,
    collate,
    list_images,
    preview,
)
from datasets.preprocessing import (
    DEFAULT_MAX_IMAGE_PIXELS,
    Preprocessing,
    ReadConfig,
    read_image,
)
from datasets.support import draw_support, load_images
from datasets.tiling import TileConfig, Tiler
from models.base import FrozenCLIPModel
from models.predictor import AnomalyPredictor
from models.registry import MODELS, find_checkpoint, load_trained_model
from models.tiling import TiledPredictor, tiled
from utils.core.checkpoint import (
    atomic_write,
    check_writable,
    file_sha256,
    out_of_space,
    replaced_folder,
    storage_error,
)
from utils.core.config import RUN, setting
from utils.core.errors import ConfigError, DataError, StorageError
from utils.core.names import printable, safe_name
from utils.core.runtime import (
    ExportReadConfig,
    RuntimeConfig,
    loader_workers,
    progress,
    resolve_device,
)
from utils.deploy import calibration as calib
from utils.deploy.export import (
    BACKENDS,
    FORMATS,
    PRECISIONS,
    ExportedPredictor,
    check_out,
    check_precision,
    open_export,
    quantize,
    quantize_with_accuracy_control,
    record_calibrations,
)
from utils.deploy.export import export as export_graph
from utils.deploy.review import (
    Pictures,
    picture_names,
    save_heat_thumbnail,
    save_thumbnail,
    write_review,
)
from utils.evaluation.visualize import overlay

logger = logging.getLogger("predict")

SCORE_COLUMNS = (
    "file",
    "image_score",
    "image_z",
    "map_score",
    "map_z",
    "decision",
    "fired",
    "error",
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as a formula
PARTIAL_SCORES = "scores.partial.csv"  # the rows so far, while score runs
# Original-code files store no backbone: in the field they default to the paper's (ViT-L-14-336).
FIELD_DATASET = "Folder"


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class FieldConfig(ExportReadConfig, RuntimeConfig):
    """What every predict.py command reads: the trained model, the class and domain it scores."""

    unused: ClassVar[tuple[str, ...]] = ("seed",)  # RuntimeConfig flags a command has no use for

    checkpoint: Path = setting(
        None,
        "checkpoint file or training save path (--backend onnxruntime/openvino: the export)",
        kind=RUN,
        required=True,
    )
    model: str | None = setting(
        None,
        "which model a save path holds (default: the one found there)",
        kind=RUN,
        choices=tuple(MODELS),
    )
    batch_size: int = setting(8, "images per forward", kind=RUN, minimum=1)
    class_name: str | None = setting(
        None,
        "prompt name of the object (default: the calibration's, else the class the "
        "checkpoint's run trained, else 'object')",
        kind=RUN,
    )
    domain: str | None = setting(
        None,
        "the images' domain, e.g. AA-CLIP's blur (default: the calibration's, else the training "
        "data set's)",
        kind=RUN,
        choices=DOMAINS,
    )


@dataclasses.dataclass
class Thresholds:
    """How normal images set the thresholds (calibrate, and export on its own graph)."""

    percentile: float = setting(99.5, "99.5 (more sensitive) or 99.9, any p in 0-100", kind=RUN)
    reduction: str = setting(
        "max", "map score: max or topk_mean of the valid pixels", kind=RUN, choices=calib.REDUCTIONS
    )
    top_fraction: float = setting(
        0.01, "topk_mean: fraction of the valid pixels", kind=RUN, above=0, maximum=1
    )
    rule: str = setting(
        "image",
        "the decision rule the calibration keeps for score: image score, pixel (map) score, "
        "either or both above their thresholds",
        kind=RUN,
        choices=calib.RULES,
    )


@dataclasses.dataclass
class CalibrateConfig(TileConfig, ReadConfig, FieldConfig, Thresholds):
    """`predict.py calibrate`: thresholds from a folder of normal images."""

    normal_dir: Path = setting(None, "folder of normal images", kind=RUN, required=True)
    output: Path | None = setting(
        None, "calibration file (default: beside the checkpoint)", kind=RUN
    )
    backend: str = setting(
        "torch",
        "torch: the checkpoint; onnxruntime, openvino: an export folder, calibrated on its own "
        "graph and precision",
        kind=RUN,
        choices=BACKENDS,
    )


@dataclasses.dataclass
class ScoreConfig(TileConfig, ReadConfig, FieldConfig):
    """`predict.py score`: score a folder of images with a calibration."""

    input: Path = setting(None, "folder of images to score", kind=RUN, required=True)
    out: Path = setting(None, "output folder", kind=RUN, required=True)
    calibration: Path | None = setting(
        None, "calibration JSON (default: the checkpoint's)", kind=RUN
    )
    labels: Path | None = setting(None, "CSV file,label (0/1) -> report", kind=RUN)
    rule: str | None = setting(
        None, "decision rule (default: the calibration's)", kind=RUN, choices=calib.RULES
    )
    reduction: str | None = setting(
        None, "map score (default: the calibration's)", kind=RUN, choices=calib.REDUCTIONS
    )
    fpr_targets: list[float] = setting(
        list(calib.DEFAULT_FPR_TARGETS),
        "with --labels: the report's TPR at these FPRs",
        kind=RUN,
        minimum=0,
        maximum=1,
    )
    overlays: bool = setting(
        True,
        f"heat-map overlays at the image's resolution, up to {PREVIEW_SIDE} px on the long side",
        kind=RUN,
        aliases={"no_overlays": 0},
    )
    backend: str = setting(
        "torch",
        "torch: the checkpoint; onnxruntime, openvino: a `predict.py export` folder",
        kind=RUN,
        choices=BACKENDS,
    )


@dataclasses.dataclass
class ExportConfig(TileConfig, FieldConfig, Thresholds):
    """`predict.py export`: a graph that runs without this code (traced on the CPU). The graph
    scores one input-sized image; `--tile` sets the tiling its k-shot memory is encoded at and
    its in-folder calibration (and int8 quantization) is made on, which `score --tile` then
    uses."""

    # skip_hash_check: the export opened here is the one just written
    unused: ClassVar[tuple[str, ...]] = ("seed", "device", "num_workers", "amp", "skip_hash_check")

    format: list[str] = setting(
        ["onnx"],
        "graph formats, written from one trace (openvino: model.xml + model.bin)",
        kind=RUN,
        choices=FORMATS,
    )
    out: Path = setting(None, "output folder", kind=RUN, required=True)
    class_name: list[str] | None = setting(
        None,
        "the classes (prompt names) the graph scores, chosen per image by its class_index input "
        "when several (default: the calibration's, else the class the checkpoint's run trained, "
        "else 'object')",
        kind=RUN,
    )
    dataset: str | None = setting(
        None,
        "export the classes of this catalogued data set (all, or those --class_name names) "
        "under its prompt names; --k_shot draws their support from its train split",
        kind=RUN,
    )
    data_root: Path | None = setting(
        None, "with --dataset: its folder; unset: data/<dataset>", kind=RUN
    )
    k_shot: int = setting(
        0,
        "SOWA: bake a memory of k normal images per class into the graph (0: zero-shot)",
        kind=RUN,
        minimum=0,
    )
    support_dir: Path | None = setting(
        None,
        "the k-shot support images: <dir>/<class>/ per class, or the folder itself for one "
        "class (default with --dataset: drawn from its train split)",
        kind=RUN,
    )
    support_seed: int = setting(42, "seed of the k-shot support draw", kind=RUN)
    precision: str = setting(
        "fp32",
        "fp32; bf16 (OpenVINO's inference precision, where the CPU computes bf16 natively); "
        "int8 (NNCF post-training quantization on --calibration_dir; OpenVINO graphs)",
        kind=RUN,
        choices=PRECISIONS,
    )
    calibration_dir: Path | None = setting(
        None,
        "normal images (<dir>/<class>/ with several classes): the graph's thresholds are "
        "calibrated on the exported graph itself, and int8 is quantized on them",
        kind=RUN,
    )
    calibration_size: int = setting(
        300,
        "int8: at most this many images of each class calibrate the quantization (NNCF's "
        "default subset size)",
        kind=RUN,
        minimum=1,
    )
    validation_dir: Path | None = setting(
        None,
        "int8 with accuracy control: labelled images, <dir>/normal/ and <dir>/abnormal/ "
        "(<dir>/<class>/normal/ ... with several classes); NNCF returns operations to float "
        "until image AUROC is within --max_auroc_drop of the fp32 graph's",
        kind=RUN,
    )
    max_auroc_drop: float = setting(
        0.5,
        "int8 with --validation_dir: the most image AUROC (points) the int8 graph may lose",
        kind=RUN,
        minimum=0.0,
    )
    calibration: Path | None = setting(
        None,
        "thresholds to ship beside an fp32 graph without --calibration_dir (default: the "
        "checkpoint's, when there is one)",
        kind=RUN,
    )


# ---------------------------------------------------------------------------------------------
# Scoring


def score_images(
    predictor: AnomalyPredictor | ExportedPredictor | TiledPredictor,
    dataset: ImageFolder,
    class_name: str,
    batch_size: int = 8,
    num_workers: int | None = None,
    top_fraction: float = 0.01,
    show_progress: bool = True,
) -> Iterator[tuple[FieldImage, dict[str, Any] | None]]:
    """Yield (item, result) per file in order; result is None for an unreadable file, else
    {"image_score", "max", "topk_mean", "mean", "anomaly_map" [S, S]} (reductions over valid
    pixels only). Letterboxed images hand their valid mask to the model (FE-CLIP's masked LFS).
    A `TiledPredictor` scores a `native` folder image by image: maps `[H, W]`."""
    if isinstance(predictor, TiledPredictor):
        yield from _score_tiled(
            predictor, dataset, class_name, num_workers, top_fraction, show_progress
        )
        return
    workers = loader_workers(num_workers, predictor.device, evaluation=True)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    for batch in progress(loader, show_progress, desc="scoring", unit="batch", leave=False):
        good = [item for item in batch if not item.error]
        results: dict[int, dict[str, Any]] = {}
        if good:
            images = torch.stack([item.image for item in good])  # [B, 3, S, S]
            valid = torch.stack([item.valid_mask for item in good]).to(predictor.device)  # [B,S,S]
            anomaly_map, image_score = predictor.predict(images, [class_name] * len(good), valid)
            # Padding is masked out of the reductions and cropped from overlays rather than set
            # to 0 (spec §14.1): AA-CLIP's raw maps can be negative, so 0 would be a high value.
            anomaly_map = anomaly_map.float()
            reductions = calib.reduce_maps(anomaly_map, valid, top_fraction)
            maps = anomaly_map.cpu().numpy()
            for row, item in enumerate(good):
                results[id(item)] = {
                    "image_score": float(image_score[row]),
                    **{name: float(values[row]) for name, values in reductions.items()},
                    "anomaly_map": maps[row],
                }
        for item in batch:
            yield item, results.get(id(item))


def _score_tiled(
    predictor: TiledPredictor,
    dataset: ImageFolder,
    class_name: str,
    num_workers: int | None,
    top_fraction: float,
    show_progress: bool = True,
) -> Iterator[tuple[FieldImage, dict[str, Any] | None]]:
    """`score_images` by tiles, one image at a time: its map `[H, W]` at its own resolution,
    reduced over all of it (tiles leave no padding in it). The item keeps a preview of the
    image (`original`), not the image: the full one is freed once scored."""
    workers = loader_workers(num_workers, predictor.device, evaluation=True)
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate)
    for (item,) in progress(loader, show_progress, desc="scoring", unit="image", leave=False):
        if item.error:
            yield item, None
            continue
        image = Image.fromarray(item.original)
        output = predictor.predict_image(image, class_name)
        item.original = np.asarray(preview(image), dtype=np.uint8)
        del image
        anomaly_map = torch.from_numpy(output.anomaly_map)[None]  # [1, H, W]
        valid = torch.ones(anomaly_map.shape, dtype=torch.bool)
        reductions = calib.reduce_maps(anomaly_map, valid, top_fraction)
        result = {name: float(values[0]) for name, values in reductions.items()}
        yield item, {"image_score": output.image_score, **result, "anomaly_map": output.anomaly_map}


def training_domain(payload: dict[str, Any]) -> str:
    """The domain of the data set a checkpoint was trained on (Industrial when unknown)."""
    dataset = (payload.get("config") or {}).get("dataset")
    return CATALOG[dataset].domain if dataset in CATALOG else DEFAULT_DOMAIN


def field_domain(domain: str | None, payload: dict[str, Any], recorded: str | None = None) -> str:
    """The domain a field command scores in: --domain, else the calibration's, else the
    training data set's; logs where it came from."""
    if domain:
        logger.info("domain %s (--domain)", domain)
        return domain
    if recorded:
        logger.info("domain %s: the calibration's (--domain overrides)", recorded)
        return recorded
    trained = training_domain(payload)
    dataset = (payload.get("config") or {}).get("dataset")
    logger.info("domain %s: the training data set's (%s; --domain overrides)", trained, dataset)
    return trained


def trained_class(payload: dict[str, Any]) -> tuple[str | None, str]:
    """(the prompt name a checkpoint's run trained one class under, or None; what the run
    trained on): a Folder run's `--class_name`, or a data set of one class."""
    run = payload.get("config") or {}
    dataset = run.get("dataset")
    if dataset == "Folder":
        name = run.get("class_name") or "object"
        return real_name(folder_info(name), name), f"its Folder run's --class_name {name}"
    if dataset in CATALOG:
        info = CATALOG[dataset]
        if len(info.classes) == 1:
            return real_name(info, info.classes[0]), f"its {dataset} run"
        return None, f"its run trained on the {len(info.classes)} classes of {dataset}"
    return None, "its run names no data set"


def field_class(
    class_name: str | None, payload: dict[str, Any], recorded: str | None = None
) -> str:
    """The class (prompt name) a field command scores: --class_name, else the calibration's
    (`recorded`), else the class the checkpoint's run trained, else the generic 'object'; logs
    where it came from."""
    if class_name:
        logger.info("class %r (--class_name)", class_name)
        return class_name
    if recorded:
        logger.info("class %r: the calibration's (--class_name overrides)", recorded)
        return recorded
    trained, source = trained_class(payload)
    if trained is not None:
        logger.info("class %r: the checkpoint's, %s (--class_name overrides)", trained, source)
        return trained
    logger.info("class 'object', the generic prompt: %s; --class_name names yours", source)
    return "object"


def _load(
    config: FieldConfig, overrides: dict[str, Any], device: torch.device
) -> tuple[str, Path, FrozenCLIPModel, dict]:
    """(model name, checkpoint file, model in eval, payload) with the model overrides applied."""
    trust = config.trust_checkpoint
    name, file = find_checkpoint(config.checkpoint, config.model, trust)
    _, model, payload = load_trained_model(file, device, name, overrides, FIELD_DATASET, trust)
    return name, file, model, payload


def _provenance(name: str, file: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """What produced a calibration or an export: the model, its checkpoint file and hash."""
    return {
        "name": name,
        "checkpoint": str(file.resolve()),
        "checkpoint_sha256": file_sha256(file),
        "epoch": payload.get("epoch"),
        "config": payload.get("config"),
    }


def calibrate_on(
    predictor: AnomalyPredictor | ExportedPredictor | TiledPredictor,
    folder: Path,
    class_name: str,
    thresholds: Thresholds,
    batch_size: int = 8,
    num_workers: int | None = None,
    show_progress: bool = True,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Score a folder of normal images with `predictor` -> the calibration's thresholds,
    statistics and the data it saw (the caller adds what produced the scores). `max_pixels`:
    the pixel budget of one image (`--max_image_pixels`)."""
    calib.check_settings(thresholds.percentile, thresholds.reduction, thresholds.rule)
    is_tiled = isinstance(predictor, TiledPredictor)
    dataset = ImageFolder(folder, predictor.preprocessing, native=is_tiled, max_pixels=max_pixels)
    image_scores: list[float] = []
    reductions: dict[str, list[float]] = {key: [] for key in ("max", "topk_mean", "mean")}
    used: list[str] = []
    skipped: list[dict[str, str]] = []
    for item, result in score_images(
        predictor,
        dataset,
        class_name,
        batch_size,
        num_workers,
        thresholds.top_fraction,
        show_progress,
    ):
        if result is None:
            logger.warning("skipped: %s", item.error)
            skipped.append({"file": item.file, "error": item.error})
            continue
        used.append(item.file)
        image_scores.append(result["image_score"])
        for key in reductions:
            reductions[key].append(result[key])
    if not used:
        raise DataError(f"no image under {folder} could be read; see the log")
    broken = sum(
        1
        for index in range(len(used))
        if not all(np.isfinite(values[index]) for values in (image_scores, *reductions.values()))
    )
    if broken:
        raise DataError(
            f"the model gives non-finite scores for {broken} of {len(used)} normal images: its "
            "checkpoint is broken (a diverged training?); retrain it before calibrating"
        )
    calibration = calib.calibrate(
        np.asarray(image_scores),
        {key: np.asarray(values) for key, values in reductions.items()},
        thresholds.percentile,
        thresholds.reduction,
        thresholds.top_fraction,
        thresholds.rule,
    )
    calibration.update(
        {
            "created": calib.now(),
            "preprocessing": predictor.preprocessing.to_dict(),
            "tiling": predictor.tiling if is_tiled else None,
            "class_name": class_name,
            "domain": predictor.domain,
            "amp": predictor.amp,
            "data": {
                "folder": str(Path(folder).resolve()),
                "count": len(used),
                "files_sha256": calib.files_digest(used),
                "skipped": skipped,
            },
        }
    )
    return calibration


def graph_record(exported: ExportedPredictor) -> dict[str, Any]:
    """What an export's calibration was made with: its graphs and precision."""
    info = exported.info
    return {
        "backend": exported.backend,
        "export_id": info["export_id"],
        "precision": info["precision"],
    }


def _report_calibration(calibration: dict[str, Any], path: Path) -> None:
    thresholds = calibration["thresholds"]
    print(
        f"calibrated on {calibration['data']['count']} normal images "
        f"(p{calibration['percentile']:g}): T_img={thresholds['image']:.6g} "
        f"T_max={thresholds['max']:.6g} T_topk_mean={thresholds['topk_mean']:.6g} -> {path}"
    )


def calibrate(config: CalibrateConfig, overrides: dict[str, Any]) -> Path:
    """Score the normal folder with the checkpoint (or an export, on its own graph), write the
    calibration JSON; returns its path. `overrides`: the model settings given (`--preprocess
    letterbox`, ...), recorded and reused by score/export."""
    calib.check_settings(config.percentile, config.reduction, config.rule)
    list_images(config.normal_dir)  # an empty folder fails before model loading
    path = config.output or calib.calibration_path(config.checkpoint)
    check_writable(Path(path).parent, "--output")
    if config.backend == "torch":
        name, file, model, payload = _load(config, overrides, resolve_device(config.device))
        predictor: AnomalyPredictor | ExportedPredictor = AnomalyPredictor(
            model, field_domain(config.domain, payload), config.amp
        )
        provenance, graph = _provenance(name, file, payload), {"backend": "torch"}
        class_name = field_class(config.class_name, payload)
        pre = predictor.preprocessing
        given = sorted(set(overrides) & set(model.config.preprocessing_settings))
        logger.info(
            "preprocessing %s (%s) at %d px, pad colour %s: %s",
            pre.geometry,
            pre.backend,
            pre.size,
            list(pre.pad_color),
            f"--{', --'.join(given)} given, the rest the checkpoint's"
            if given
            else "the checkpoint's (--preprocess, --pad_color ... override)",
        )
    else:
        predictor = open_export(
            config.checkpoint, config.backend, overrides, config.skip_hash_check
        )
        provenance, graph = predictor.info["model"], graph_record(predictor)
        class_name = config.class_name or predictor.classes[0]["prompt"]
        _check_export(predictor, class_name, config.domain or predictor.domain, config.tiling())
    calibration = calibrate_on(
        tiled(predictor, config, config.batch_size),
        config.normal_dir,
        class_name,
        config,
        config.batch_size,
        config.num_workers,
        config.progress,
        config.max_image_pixels,
    )
    calibration.update({"model": provenance, "graph": graph, "overrides": overrides})
    calib.save_calibration(path, calibration)
    _report_calibration(calibration, path)
    return path


def read_labels(path: Path, files: list[str]) -> dict[str, int]:
    """labels.csv (header `file,label`, label 0/1) -> {relative file: label} for `files`.

    A label's file matches a relative path, or else a unique base name; `files` are
    `printable`, and a label names a file that is not UTF-8 by its bytes or their `\\xNN` form."""
    if not Path(path).is_file():
        raise DataError(f"labels file {path} does not exist; pass a CSV with columns file,label")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path} needs a header with columns file,label")
        rows = list(reader)
    by_name: dict[str, list[str]] = {}
    for name in files:
        by_name.setdefault(Path(name).name, []).append(name)
    known = set(files)
    labels: dict[str, int] = {}
    unmatched = 0
    for row in rows:
        value = (row["label"] or "").strip()
        if value not in ("0", "1"):
            raise DataError(f"{path}: label {value!r} for {row['file']!r} is not 0 or 1")
        key = printable(Path(row["file"].strip()).as_posix())
        if key not in known:
            candidates = by_name.get(Path(key).name, [])
            if len(candidates) != 1:
                unmatched += 1
                continue
            key = candidates[0]
        labels[key] = int(value)
    if unmatched:
        logger.warning("%d labels name files that were not scored; ignored", unmatched)
    return labels


def _csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a
    leading `'`; numbers stay numbers."""
    if isinstance(value, str) and value[:1] in FORMULA_STARTS:
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


class ScoresFile:
    """scores.csv written as the files are scored: each row is appended to
    `scores.partial.csv` in the output folder and flushed at once, so a run that dies keeps
    the rows before (and a previous scores.csv stays as it was); `finish` moves it over
    scores.csv. UTF-8 (names are `printable`); a failed write raises StorageError. A context
    manager: leaving it closes the file, finished or not."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / "scores.csv"
        self.partial = Path(out) / PARTIAL_SCORES
        try:
            self._handle = open(self.partial, "w", newline="", encoding="utf-8")
        except OSError as error:
            raise storage_error(self.partial, error) from error
        self._writer = csv.DictWriter(self._handle, fieldnames=SCORE_COLUMNS, lineterminator="\n")
        self._write(self._writer.writeheader)

    def write(self, row: dict[str, Any]) -> None:
        self._write(lambda: self._writer.writerow({k: _csv_cell(v) for k, v in row.items()}))

    def __enter__(self) -> ScoresFile:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._handle.close()

    def finish(self) -> Path:
        """Close the file and move it over scores.csv; returns scores.csv's path."""
        self._write(lambda: os.fsync(self._handle.fileno()))
        self._handle.close()
        try:
            os.replace(self.partial, self.path)
        except OSError as error:
            raise storage_error(self.path, error) from error
        return self.path

    def _write(self, write: Any) -> None:
        try:
            write()
            self._handle.flush()
        except OSError as error:
            self._handle.close()
            raise storage_error(self.partial, error) from error


def _save_pictures(
    config: ScoreConfig,
    picture: Pictures,
    item: FieldImage,
    anomaly_map: np.ndarray,
    calibration: dict,
) -> None:
    """A scored file's thumbnail, heat thumbnail and (with --overlays) overlay, drawn from its
    preview (`original`): StorageError when one cannot be written."""
    save_thumbnail(config.out / picture.thumbnail, item.original)
    geometry = item.picture_geometry()
    save_heat_thumbnail(
        config.out / picture.heat, item.original, anomaly_map, geometry, calibration
    )
    if config.overlays:
        _save_overlay(config.out / picture.overlay, item, anomaly_map, calibration)


def _save_overlay(path: Path, item: FieldImage, anomaly_map: np.ndarray, calibration: dict) -> None:
    """Overlay over the region the model saw, at the preview's resolution (`original`: the
    image's, up to PREVIEW_SIDE px): content rectangle cropped, calibration-scaled heat."""
    geometry = item.picture_geometry()
    heat = calib.heat(geometry.to_original(anomaly_map), calibration)
    left, top, right, bottom = geometry.crop
    picture = Image.fromarray(overlay(item.original[top:bottom, left:right], heat))
    atomic_write(path, lambda file: picture.save(file, format="PNG"))


def _check_export(
    exported: ExportedPredictor, class_name: str, domain: str, tiling: dict[str, Any] | None
) -> None:
    """An export scores the classes and domain it was traced for, and a k-shot export the
    tiling its memory was encoded at: refuse others."""
    exported.class_index([class_name])
    if exported.domain != domain:
        raise ConfigError(
            f"the export holds domain={exported.domain!r}, not {domain!r}; export again with "
            f"--domain {domain} or score with its own"
        )
    if exported.k_shot and exported.support_tiling != tiling:
        raise ConfigError(
            f"the export's k-shot memory was encoded {_tiling_flags(exported.support_tiling)}, "
            f"and support and test patches must share a scale: score "
            f"{_tiling_flags(exported.support_tiling)}, or export again "
            f"{_tiling_flags(tiling)}"
        )


def _classes(
    config: ExportConfig, recorded: dict[str, Any], payload: dict[str, Any]
) -> list[dict[str, str]]:
    """The export's classes: names, and the prompts their texts are made of (without
    --class_name or --dataset, `field_class`'s)."""
    if config.dataset is None:
        given = config.class_name or [None]
        names = [field_class(name, payload, recorded.get("class_name")) for name in given]
        return [{"name": name, "prompt": name} for name in names]
    info = get_dataset_info(config.dataset)
    names = config.class_name or list(info.classes)
    unknown = sorted(set(names) - set(info.classes))
    if unknown:
        raise ConfigError(
            f"{config.dataset} has no class {', '.join(unknown)}; its classes are "
            f"{', '.join(info.classes)}"
        )
    return [{"name": name, "prompt": real_name(info, name)} for name in names]


def _class_folder(root: Path, name: str, several: bool, flag: str) -> Path:
    """`<root>/<name>/` when an export has several classes, else `root` itself."""
    folder = Path(root) / name if several else Path(root)
    if not folder.is_dir():
        raise DataError(
            f"{flag} {root} has no folder {name}/; with several classes it holds one each"
        )
    return folder


def _support(
    config: ExportConfig, classes: list[dict[str, str]], predictor: AnomalyPredictor
) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """Each class's k-shot memory and the support files it was encoded from (None: zero-shot)."""
    if config.k_shot == 0:
        return None, None
    model = predictor.model
    if not model.supports_memory:
        raise ConfigError(
            f"--k_shot {config.k_shot} needs a support memory (sowa), not {model.name}"
        )
    memories, files = [], {}
    several = len(classes) > 1
    for entry in classes:
        name = entry["name"]
        if config.support_dir is not None:
            candidates = list_images(
                _class_folder(config.support_dir, name, several, "--support_dir")
            )
            paths = random.Random(config.support_seed).sample(
                candidates, min(config.k_shot, len(candidates))
            )
        elif config.dataset is not None:
            root = config.data_root or default_data_root(config.dataset)
            paths = draw_support(config.dataset, root, name, config.k_shot, config.support_seed)
        else:
            raise ConfigError("--k_shot needs --support_dir, or --dataset with its train split")
        files[name] = [str(path) for path in paths]
        if config.tile:  # support patches at the scale of the tiles scored
            images = TiledPredictor(predictor, config, config.batch_size).support_images(paths)
        else:
            images = load_images(paths, predictor.preprocessing)
        with torch.no_grad():
            memories.append(model.encode_memory(images))
    return memories, {"seed": config.support_seed, "files": files, "tiling": config.tiling()}


def _spread(items: list[Any], limit: int | None) -> list[Any]:
    """At most `limit` of `items`, evenly spaced over them."""
    if limit is None or len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(index * step)] for index in range(limit)]


def _feeds(
    folder: Path,
    preprocessing: Preprocessing,
    limit: int | None = None,
    tiling: Tiler | None = None,
) -> list[dict[str, np.ndarray]]:
    """One graph feed per readable image of a folder (at most `limit`, spread over it); with
    `tiling`, one per tile, at most `limit` in all (spread over the images and their tiles)."""
    files = _spread(list_images(folder), limit)
    feeds = []
    for path in files:
        try:
            if tiling is None:
                prepared = [preprocessing.load(path)[:2]]
            else:
                image = tiling.scaled(read_image(path, preprocessing.pad_color))
                per_image = None if limit is None else -(-limit // len(files))  # ceil
                tiles = tiling.batch(image, _spread(tiling.positions(image), per_image))
                prepared = list(zip(tiles.images, tiles.valid_mask, strict=True))
        except DataError as error:
            logger.warning("skipped: %s", error)
            continue
        for pixels, valid_mask in prepared:
            feed = {"image": pixels[None].numpy()}
            if preprocessing.pads:
                feed["valid_mask"] = valid_mask[None].numpy()
            feeds.append(feed)
    if not feeds:
        raise DataError(f"no image under {folder} could be read")
    return _spread(feeds, limit)  # tiles: a few per image, rounded up


def _quantization(config: ExportConfig, preprocessing: Preprocessing, several: bool) -> Any:
    """int8: the quantization an export runs on its OpenVINO model (calibration feeds from
    --calibration_dir; with --validation_dir, under accuracy control)."""
    feeds, validation = [], []
    tiling = Tiler(preprocessing, config) if config.tile else None
    for index, name in enumerate(config.class_name or []):
        folder = _class_folder(config.calibration_dir, name, several, "--calibration_dir")
        for feed in _feeds(folder, preprocessing, config.calibration_size, tiling):
            # the backbone's activations: each image under its own class
            feeds.append(_with_class(feed, index, several))
        if config.validation_dir is not None:
            labelled = _class_folder(config.validation_dir, name, several, "--validation_dir")
            for label, kind in enumerate(("normal", "abnormal")):
                if not (labelled / kind).is_dir():
                    raise DataError(
                        f"--validation_dir {labelled} has no {kind}/ folder; it holds normal/ "
                        "and abnormal/ images"
                    )
                for feed in _feeds(labelled / kind, preprocessing):
                    validation.append((_with_class(feed, index, several), label, index))
    if config.validation_dir is None:
        return lambda model: (quantize(model, feeds, config.calibration_size), None)
    return lambda model: quantize_with_accuracy_control(
        model, feeds, config.calibration_size, validation, config.max_auroc_drop
    )


def _with_class(feed: dict[str, np.ndarray], index: int, several: bool) -> dict[str, np.ndarray]:
    """A feed of a several-class graph names its class."""
    return {**feed, "class_index": np.array([index])} if several else feed


def export(config: ExportConfig, overrides: dict[str, Any]) -> dict[str, Path]:
    """Write the export folder whole; returns {format: graph path}. It is written into a
    temporary folder beside --out that then replaces --out (an export, or a new or empty
    folder): a failed or interrupted export leaves the previous one intact, and no calibration
    or graph of the previous one stays beside the new graph."""
    check_out(config.out)
    with replaced_folder(config.out) as folder:
        return _export_into(config, overrides, folder)


def _export_into(config: ExportConfig, overrides: dict[str, Any], folder: Path) -> dict[str, Path]:
    """`export` writing into `folder`, which becomes --out. The calibration's class, domain
    and model overrides are the defaults; flags win. With --calibration_dir the thresholds are
    calibrated on the exported graph itself (one calibration per class)."""
    check_precision(config.precision, config.format)
    if config.precision == "int8" and config.calibration_dir is None:
        raise ConfigError(
            "--precision int8 quantizes on normal images: pass --calibration_dir (the folder "
            "predict.py calibrate reads)"
        )
    if config.validation_dir is not None and config.precision != "int8":
        raise ConfigError(
            f"--validation_dir controls int8's accuracy; --precision {config.precision} is not "
            "quantized: drop it, or export --precision int8"
        )
    if config.validation_dir is not None and config.tile:
        raise ConfigError(
            "--validation_dir measures image AUROC on whole images, which a tiled export does "
            "not score: drop --validation_dir (int8 is then quantized on tiles of "
            "--calibration_dir without accuracy control), or export without --tile"
        )
    check_writable(config.out, "--out")
    calibration_file = config.calibration or calib.calibration_path(config.checkpoint)
    recorded: dict[str, Any] = {}
    if config.calibration is not None or Path(calibration_file).is_file():
        recorded = calib.load_calibration(calibration_file)
    overrides = {**recorded.get("overrides", {}), **overrides}
    name, file, model, payload = _load(config, overrides, torch.device("cpu"))
    classes = _classes(config, recorded, payload)
    domain = field_domain(config.domain, payload, recorded.get("domain"))
    predictor = AnomalyPredictor(model, domain)
    several = len(classes) > 1
    if config.calibration_dir is not None:  # every class's folder, before the long trace
        for entry in classes:
            list_images(
                _class_folder(config.calibration_dir, entry["name"], several, "--calibration_dir")
            )
    memories, support = _support(config, classes, predictor)
    quantization = None
    if config.precision == "int8":
        quantization = _quantization(
            dataclasses.replace(config, class_name=[entry["name"] for entry in classes]),
            predictor.preprocessing,
            several,
        )
    info = {
        "model": _provenance(name, file, payload),
        "overrides": overrides,  # the model settings given, the calibration's first
        "classes": classes,
        "k_shot": config.k_shot,
        "support": support,
        "created": calib.now(),
    }
    targets = export_graph(
        predictor,
        folder,
        config.format,
        [entry["prompt"] for entry in classes],
        info,
        memories,
        config.precision,
        quantization,
    )
    targets = {fmt: Path(config.out) / path.name for fmt, path in targets.items()}
    paths = ", ".join(str(path) for path in targets.values())
    names = ", ".join(repr(entry["name"]) for entry in classes)
    print(f"exported {name} ({config.precision}) for {names} ({domain}) -> {paths}")
    shipped: dict[str, tuple[str, dict[str, Any]]] = {}
    if config.calibration_dir is not None:
        backend = "openvino" if "openvino" in config.format else "onnxruntime"
        exported = ExportedPredictor(folder, backend)
        for entry in classes:
            normal = _class_folder(
                config.calibration_dir, entry["name"], several, "--calibration_dir"
            )
            calibration = calibrate_on(
                tiled(exported, config, config.batch_size),
                normal,
                entry["prompt"],
                config,
                config.batch_size,
                None,
                config.progress,
            )
            calibration.update(
                {
                    "model": exported.info["model"],
                    "graph": graph_record(exported),
                    "overrides": overrides,
                }
            )
            stem = safe_name(f"calibration_{entry['name']}") if several else "calibration"
            path = calib.save_calibration(folder / f"{stem}.json", calibration)
            _report_calibration(calibration, path)
            shipped[entry["name"]] = (path.name, calibration)
    elif (
        recorded
        and config.precision == "fp32"
        and not several
        and recorded["class_name"] in (classes[0]["name"], classes[0]["prompt"])
        and recorded.get("tiling") == config.tiling()
    ):
        # an fp32 graph scores as the checkpoint does (tested to 1e-6): its thresholds fit,
        # for the class they were calibrated on
        _check_calibration(recorded, calibration_file, name, predictor.preprocessing)
        calib.save_calibration(folder / "calibration.json", recorded)
        shipped[classes[0]["name"]] = ("calibration.json", recorded)
    else:
        if recorded and recorded.get("tiling") != config.tiling():
            logger.warning(
                "%s was calibrated %s, not %s: not shipped",
                calibration_file,
                _tiling_flags(recorded.get("tiling")),
                _tiling_flags(config.tiling()),
            )
        logger.warning(
            "no calibration of this graph: pass --calibration_dir, or run predict.py calibrate "
            "--backend openvino --checkpoint %s --normal_dir DIR%s",
            config.out,
            "" if config.tiling() is None else " " + _tiling_flags(config.tiling())[5:],
        )
    record_calibrations(folder, shipped)
    return targets


def _check_calibration(
    calibration: dict[str, Any], path: Path, name: str, preprocessing: Preprocessing
) -> None:
    """Thresholds fit a model only at its input size; other preprocessing is a warning."""
    calibrated = Preprocessing.from_dict(calibration["preprocessing"], str(path))
    if name != calibration["model"]["name"] or preprocessing.size != calibrated.size:
        raise ConfigError(
            f"{path} calibrates a {calibration['model']['name']} model at {calibrated.size} px, "
            f"not this {name} at {preprocessing.size} px; recalibrate"
        )
    if preprocessing != calibrated:
        differ = {
            key: (value, calibrated.to_dict()[key])
            for key, value in preprocessing.to_dict().items()
            if value != calibrated.to_dict()[key]
        }
        logger.warning(
            "scoring with other preprocessing than the thresholds were calibrated with "
            "(now, then): %s",
            differ,
        )


def _tiling_flags(tiling: dict[str, Any] | None) -> str:
    if tiling is None:
        return "on whole images (no --tile)"
    return (
        f"with --tile {tiling['tile']} --tile_overlap {tiling['overlap']:g} "
        f"--tile_scale {tiling['scale']:g}"
    )


def _check_tiling(calibration: dict[str, Any], path: Path, tiling: dict[str, Any] | None) -> None:
    """Thresholds fit the maps they were calibrated on: whole images, or the same tiles."""
    calibrated = calibration.get("tiling")
    if calibrated != tiling:
        raise ConfigError(
            f"{path} was calibrated {_tiling_flags(calibrated)}, not {_tiling_flags(tiling)}: "
            "thresholds move with the tiling; score with the calibration's flags or recalibrate"
        )


def _check_graph(
    calibration: dict[str, Any], path: Path, predictor: AnomalyPredictor | ExportedPredictor
) -> None:
    """Thresholds come from scores of the same graph and precision: a calibration of an export
    fits that export; a calibration of the checkpoint fits it and its fp32 exports."""
    graph = calibration.get("graph") or {"backend": "torch"}
    if isinstance(predictor, AnomalyPredictor):
        fits = graph["backend"] == "torch"
        here = "the checkpoint (torch)"
    else:
        info = predictor.info
        same_export = graph.get("export_id") == info["export_id"]
        checkpoint = calibration["model"].get("checkpoint_sha256")
        same_checkpoint = checkpoint == info["model"]["checkpoint_sha256"]
        fits = same_export or (
            graph["backend"] == "torch" and info["precision"] == "fp32" and same_checkpoint
        )
        here = f"this {info['precision']} export"
    if not fits:
        made = (
            graph["backend"]
            if graph["backend"] == "torch"
            else (f"a {graph.get('precision')} export {graph.get('export_id', '?')[:12]}")
        )
        raise ConfigError(
            f"{path} was calibrated on {made}, not on {here}: thresholds move with the graph and "
            "its precision; calibrate on it (predict.py calibrate with its --backend and "
            "--checkpoint, or export with --calibration_dir)"
        )


def score(config: ScoreConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Score the input folder; write scores.csv, overlays and the optional report.

    Returns {"rows": [...], "report": dict | None}."""
    calibration_file = config.calibration or calib.calibration_path(config.checkpoint)
    calibration = calib.load_calibration(calibration_file)
    class_name = field_class(config.class_name, {}, calibration["class_name"])
    rule = config.rule or calibration["rule"]
    reduction = config.reduction or calibration["reduction"]
    domain = field_domain(config.domain, {}, calibration["domain"])
    if domain != calibration["domain"]:
        logger.warning(
            "scoring as %s but the thresholds come from %s maps", domain, calibration["domain"]
        )
    files = list_images(config.input)  # an empty folder fails before model loading
    known_labels: dict[str, int] = {}
    if config.labels is not None:  # a wrong labels file fails before any image is scored
        known_labels = read_labels(
            config.labels, [printable(path.relative_to(config.input).as_posix()) for path in files]
        )
        if not known_labels:
            raise DataError(
                f"no image under {config.input} has a label in {config.labels}; its file column "
                "holds paths relative to --input (or unique base names)"
            )
    if config.backend == "torch":
        overrides = {**calibration["overrides"], **overrides}
        name, file, model, _ = _load(config, overrides, resolve_device(config.device))
        predictor: AnomalyPredictor | ExportedPredictor = AnomalyPredictor(
            model, domain, config.amp
        )
        checkpoint_sha256 = file_sha256(file)
        scoring_amp = predictor.amp
    else:
        predictor = open_export(
            config.checkpoint, config.backend, overrides, config.skip_hash_check
        )
        file, exported = config.checkpoint, predictor.info
        name, checkpoint_sha256 = exported["model"]["name"], exported["model"]["checkpoint_sha256"]
        _check_export(predictor, class_name, domain, config.tiling())
        scoring_amp = predictor.amp
    _check_graph(calibration, calibration_file, predictor)
    if scoring_amp != calibration["amp"]:
        logger.warning(
            "scoring with amp %s but the thresholds come from amp %s maps",
            scoring_amp,
            calibration["amp"],
        )
    _check_calibration(calibration, calibration_file, name, predictor.preprocessing)
    _check_tiling(calibration, calibration_file, config.tiling())
    if checkpoint_sha256 != calibration["model"].get("checkpoint_sha256"):
        logger.warning(
            "%s was calibrated with another checkpoint file; thresholds may not fit", file
        )
    preprocessing = predictor.preprocessing
    logger.info(
        "scoring %d files: %s (%s), %s, %s (%s) at %d px, rule=%s, reduction=%s, p%g",
        len(files),
        name,
        config.backend,
        domain,
        preprocessing.geometry,
        preprocessing.backend,
        preprocessing.size,
        rule,
        reduction,
        calibration["percentile"],
    )
    dataset = ImageFolder(
        config.input,
        preprocessing,
        keep_original=True,  # thumbnails for the review page, overlays
        files=files,
        native=config.tile > 0,
        max_pixels=config.max_image_pixels,
    )
    predictor = tiled(predictor, config, config.batch_size)
    stats = calibration["stats"]
    rows: list[dict[str, Any]] = []
    names = picture_names([dataset.relative_name(index) for index in range(len(dataset))])
    pictures: dict[str, Pictures] = {}
    scored: list[tuple[int, float, float]] = []  # (row index, image score, map score)
    with ScoresFile(config.out) as scores:
        for item, result in score_images(
            predictor,
            dataset,
            class_name,
            config.batch_size,
            config.num_workers,
            calibration["top_fraction"],
            config.progress,
        ):
            error_row = {**dict.fromkeys(SCORE_COLUMNS, ""), "file": item.file}
            if result is None:
                logger.warning("unreadable: %s", item.error)
                row = {**error_row, "error": item.error}
            else:
                image_score, map_score = result["image_score"], result[reduction]
                decision, fired = calib.decide(
                    calibration, np.array([image_score]), np.array([map_score]), rule, reduction
                )
                row = {
                    "file": item.file,
                    "image_score": f"{image_score:.8g}",
                    "image_z": f"{calib.z_score(image_score, stats['image']):.6g}",
                    "map_score": f"{map_score:.8g}",
                    "map_z": f"{calib.z_score(map_score, stats[reduction]):.6g}",
                    "decision": "anomalous" if decision[0] else "normal",
                    "fired": fired[0],
                    "error": "",
                }
                try:
                    _save_pictures(
                        config, names[item.file], item, result["anomaly_map"], calibration
                    )
                except StorageError as error:
                    if out_of_space(error):  # every later write would fail too
                        raise StorageError(
                            f"{error}; the {len(rows)} rows scored before are in {scores.partial}"
                        ) from error
                    logger.warning("%s: %s", item.file, error)
                    row = {**error_row, "error": printable(f"pictures not written: {error}")}
                else:
                    scored.append((len(rows), image_score, map_score))
                    pictures[item.file] = names[item.file]
            rows.append(row)
            scores.write(row)
        scores_path = scores.finish()
    errors = sum(1 for row in rows if row["error"])
    anomalous = sum(1 for row in rows if row["decision"] == "anomalous")
    print(
        f"scored {len(scored)} of {len(rows)} files: {anomalous} anomalous "
        f"(rule {rule}, {reduction}), {errors} with errors -> {scores_path}"
    )
    report, labelled = None, None
    if config.labels is not None:
        report, curves, labels = _report(
            config, calibration_file, rows, scored, rule, reduction, calibration, known_labels
        )
        labelled = {"report": report, "curves": curves, "labels": labels}
    review = {"backend": config.backend, "rule": rule, "reduction": reduction}
    review |= {
        "class_name": class_name,
        "domain": domain,
        "preprocessing": f"{preprocessing.geometry} ({preprocessing.backend} resize)",
    }
    page = write_review(config.out, rows, calibration, review, pictures, labelled)
    logger.info("review page: %s", page)
    return {"rows": rows, "report": report}


def _null_nan(value: Any) -> Any:
    """NaN and inf (an AUROC with one label only) as None: JSON has no NaN, `null` it has."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _null_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_null_nan(item) for item in value]
    return value


def _report(
    config: ScoreConfig,
    calibration_file: Path,
    rows: list[dict[str, Any]],
    scored: list[tuple[int, float, float]],
    rule: str,
    reduction: str,
    calibration: dict,
    known_labels: dict[str, int],
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray, float]], dict[str, int]]:
    """report.json / report.md from `known_labels` (`read_labels` of the input's files); returns
    the report, the review page's ROC curves and the scored files' labels."""
    scored_files = {rows[index]["file"] for index, _, _ in scored}
    labels = {file: label for file, label in known_labels.items() if file in scored_files}
    labelled = [(index, s, m) for index, s, m in scored if rows[index]["file"] in labels]
    if not labelled:
        raise DataError(f"no scored file has a label in {config.labels}; check its file column")
    image_scores = np.array([s for _, s, _ in labelled])
    map_scores = np.array([m for _, _, m in labelled])
    truth = np.array([labels[rows[index]["file"]] for index, _, _ in labelled])
    decisions, _ = calib.decide(calibration, image_scores, map_scores, rule, reduction)
    report = calib.label_report(
        image_scores, map_scores, decisions, truth, tuple(config.fpr_targets)
    )
    report["settings"] = {
        "calibration": str(Path(calibration_file).resolve()),
        "rule": rule,
        "reduction": reduction,
        "percentile": calibration["percentile"],
        "labels": str(Path(config.labels).resolve()),
        "unlabelled_scored": len(scored) - len(labelled),
    }
    text = calib.format_report(report)
    body = json.dumps(_null_nan(report), indent=2, default=str, allow_nan=False) + "\n"
    atomic_write(config.out / "report.json", lambda file: file.write(body), mode="w")
    atomic_write(config.out / "report.md", lambda file: file.write(text + "\n"), mode="w")
    print(text)
    curves = {
        name: (scores, truth, report["ranking"][key]["auroc"])
        for name, key, scores in (
            ("image score", "image_score", image_scores),
            ("map score", "map_score", map_scores),
        )
    }
    return report, curves, labels
