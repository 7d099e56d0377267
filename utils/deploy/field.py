"""The field engineer's commands (predict.py): calibrate thresholds on normal images, score
folders of new images, export a graph that runs without this code.

Every model in models.registry works through one predictor, which owns the model's
preprocessing (`--preprocess letterbox`, `--pad_color`, ... override it, and the override is
recorded). `calibrate` writes `<save path>/calibration.json` (or `<stem>.calibration.json` beside
a checkpoint file): thresholds, normal-score statistics, the model, its exact preprocessing, the
class, domain and overrides, and the data it saw (utils/deploy/calibration.py). `score` reuses the
calibration's class, domain and overrides unless flags override them, and writes `scores.csv`,
one heat-map overlay per image over the region the model saw, at the image's resolution
(`overlays/<file>.png`, padding cropped away), with `--labels` `report.json` / `report.md`, and the
review page `index.html` (utils/deploy/review.py). An unreadable file becomes a row with an error,
not a stopped run. `export` writes a graph (utils/deploy/export.py); `score --backend
onnxruntime|openvino` scores with it, through the preprocessing its model.json records.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.catalog import CATALOG, DEFAULT_DOMAIN, DOMAINS
from datasets.folder import FieldImage, ImageFolder, collate, list_images
from datasets.preprocessing import Preprocessing
from models.base import FrozenCLIPModel
from models.predictor import AnomalyPredictor
from models.registry import MODELS, find_checkpoint, load_trained_model
from utils.core.checkpoint import atomic_write, check_writable, file_sha256
from utils.core.config import RUN, setting
from utils.core.errors import ConfigError, DataError
from utils.core.runtime import RuntimeConfig, loader_workers, progress, resolve_device
from utils.deploy import calibration as calib
from utils.deploy.export import BACKENDS, FORMATS, ExportedPredictor
from utils.deploy.export import export as export_graph
from utils.deploy.review import save_thumbnail, write_review
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
# Original-code files store no backbone: in the field they default to the paper's (ViT-L-14-336).
FIELD_DATASET = "Folder"


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class FieldConfig(RuntimeConfig):
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
        None, "prompt name of the object (default: the calibration's, else object)", kind=RUN
    )
    domain: str | None = setting(
        None,
        "the images' domain, e.g. AA-CLIP's blur (default: the calibration's, else the training "
        "data set's)",
        kind=RUN,
        choices=DOMAINS,
    )


@dataclasses.dataclass
class CalibrateConfig(FieldConfig):
    """`predict.py calibrate`: thresholds from a folder of normal images."""

    normal_dir: Path = setting(None, "folder of normal images", kind=RUN, required=True)
    percentile: float = setting(99.5, "99.5 (more sensitive) or 99.9, any p in 0-100", kind=RUN)
    reduction: str = setting(
        "max", "map score: max or topk_mean of the valid pixels", kind=RUN, choices=calib.REDUCTIONS
    )
    top_fraction: float = setting(
        0.01, "topk_mean: fraction of the valid pixels", kind=RUN, above=0, maximum=1
    )
    rule: str = setting("image", "default decision rule", kind=RUN, choices=calib.RULES)
    output: Path | None = setting(
        None, "calibration file (default: beside the checkpoint)", kind=RUN
    )


@dataclasses.dataclass
class ScoreConfig(FieldConfig):
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
    overlays: bool = setting(True, "heat-map overlays", kind=RUN, aliases={"no_overlays": 0})
    backend: str = setting(
        "torch",
        "torch: the checkpoint; onnxruntime, openvino: a `predict.py export` folder",
        kind=RUN,
        choices=BACKENDS,
    )


@dataclasses.dataclass
class ExportConfig(FieldConfig):
    """`predict.py export`: a graph that runs without this code (traced on the CPU, float32)."""

    unused: ClassVar[tuple[str, ...]] = ("seed", "device", "num_workers", "amp", "batch_size")

    format: list[str] = setting(
        ["onnx"],
        "graph formats, written from one trace (openvino: model.xml + model.bin)",
        kind=RUN,
        choices=FORMATS,
    )
    out: Path = setting(None, "output folder", kind=RUN, required=True)
    calibration: Path | None = setting(
        None,
        "thresholds to ship beside the graph (default: the checkpoint's, when there is one)",
        kind=RUN,
    )


# ---------------------------------------------------------------------------------------------
# Scoring


def score_images(
    predictor: AnomalyPredictor | ExportedPredictor,
    dataset: ImageFolder,
    class_name: str,
    batch_size: int = 8,
    num_workers: int | None = None,
    top_fraction: float = 0.01,
    show_progress: bool = True,
) -> Iterator[tuple[FieldImage, dict[str, Any] | None]]:
    """Yield (item, result) per file in order; result is None for an unreadable file, else
    {"image_score", "max", "topk_mean", "mean", "anomaly_map" [S, S]} (reductions over valid
    pixels only). Letterboxed images hand their valid mask to the model (FE-CLIP's masked LFS)."""
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


def training_domain(payload: dict[str, Any]) -> str:
    """The domain of the data set a checkpoint was trained on (Industrial when unknown)."""
    dataset = (payload.get("config") or {}).get("dataset")
    return CATALOG[dataset].domain if dataset in CATALOG else DEFAULT_DOMAIN


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


def calibrate(config: CalibrateConfig, overrides: dict[str, Any]) -> Path:
    """Score the normal folder, write the calibration JSON; returns its path. `overrides`: the
    model settings given (`--preprocess letterbox`, ...), recorded and reused by score/export."""
    calib.check_settings(config.percentile, config.reduction, config.rule)
    device = resolve_device(config.device)
    dataset_files = list_images(config.normal_dir)  # an empty folder fails before model loading
    path = config.output or calib.calibration_path(config.checkpoint)
    check_writable(Path(path).parent, "--output")
    name, file, model, payload = _load(config, overrides, device)
    domain = config.domain or training_domain(payload)
    class_name = config.class_name or "object"
    predictor = AnomalyPredictor(model, domain, config.amp)
    dataset = ImageFolder(config.normal_dir, predictor.preprocessing, files=dataset_files)
    image_scores: list[float] = []
    reductions: dict[str, list[float]] = {key: [] for key in ("max", "topk_mean", "mean")}
    used: list[str] = []
    skipped: list[dict[str, str]] = []
    for item, result in score_images(
        predictor,
        dataset,
        class_name,
        config.batch_size,
        config.num_workers,
        config.top_fraction,
        config.progress,
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
        raise DataError(f"no image under {config.normal_dir} could be read; see the log")
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
        config.percentile,
        config.reduction,
        config.top_fraction,
        config.rule,
    )
    calibration.update(
        {
            "created": calib.now(),
            "model": _provenance(name, file, payload),
            "preprocessing": predictor.preprocessing.to_dict(),
            "class_name": class_name,
            "domain": domain,
            "amp": predictor.amp,
            "overrides": overrides,
            "data": {
                "folder": str(Path(config.normal_dir).resolve()),
                "count": len(used),
                "files_sha256": calib.files_digest(used),
                "skipped": skipped,
            },
        }
    )
    calib.save_calibration(path, calibration)
    thresholds = calibration["thresholds"]
    print(
        f"calibrated on {len(used)} normal images (p{config.percentile:g}): "
        f"T_img={thresholds['image']:.6g} T_max={thresholds['max']:.6g} "
        f"T_topk_mean={thresholds['topk_mean']:.6g} -> {path}"
    )
    return path


def read_labels(path: Path, files: list[str]) -> dict[str, int]:
    """labels.csv (header `file,label`, label 0/1) -> {relative file: label} for `files`.

    A label's file matches a relative path, or else a unique base name."""
    if not Path(path).is_file():
        raise DataError(f"labels file {path} does not exist; pass a CSV with columns file,label")
    with open(path, newline="") as handle:
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
        key = Path(row["file"].strip()).as_posix()
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


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SCORE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda file: file.write(buffer.getvalue()), mode="w")


def _save_overlay(path: Path, item: FieldImage, anomaly_map: np.ndarray, calibration: dict) -> None:
    """Overlay over the region the model saw, at the image's resolution: content rectangle
    cropped, calibration-scaled heat."""
    heat = calib.heat(item.geometry.to_original(anomaly_map), calibration)
    left, top, right, bottom = item.geometry.crop
    picture = Image.fromarray(overlay(item.original[top:bottom, left:right], heat))
    atomic_write(path, lambda file: picture.save(file, format="PNG"))


def _check_export(exported: ExportedPredictor, class_name: str, domain: str) -> None:
    """An export scores the class and domain it was traced for: refuse others."""
    for key, value in {"class_name": class_name, "domain": domain}.items():
        baked = getattr(exported, key)
        if baked != value:
            raise ConfigError(
                f"the export holds {key}={baked!r}, not {value!r}; export again with "
                f"--{key} {value} or score with its own"
            )


def export(config: ExportConfig, overrides: dict[str, Any]) -> dict[str, Path]:
    """Write the export folder; returns {format: graph path}. The calibration's class, domain
    and model overrides are the defaults; flags win."""
    check_writable(config.out, "--out")
    calibration_file = config.calibration or calib.calibration_path(config.checkpoint)
    calibration = None
    if config.calibration is not None or Path(calibration_file).is_file():
        calibration = calib.load_calibration(calibration_file)
    recorded = calibration or {}
    overrides = {**recorded.get("overrides", {}), **overrides}
    name, file, model, payload = _load(config, overrides, torch.device("cpu"))
    class_name = config.class_name or recorded.get("class_name", "object")
    domain = config.domain or recorded.get("domain") or training_domain(payload)
    predictor = AnomalyPredictor(model, domain)
    if calibration is not None:
        _check_calibration(calibration, calibration_file, name, predictor.preprocessing)
    info = {
        "model": _provenance(name, file, payload),
        "overrides": overrides,  # the model settings given, the calibration's first
        "created": calib.now(),
        "calibration": None,
    }
    if calibration is not None:
        info["calibration"] = {
            key: calibration[key]
            for key in ("thresholds", "percentile", "rule", "reduction", "top_fraction")
        }
    targets = export_graph(predictor, config.out, config.format, class_name, info)
    if calibration is not None:  # score --backend finds it where it looks for a save path's
        calib.save_calibration(config.out / "calibration.json", calibration)
    paths = ", ".join(str(path) for path in targets.values())
    print(f"exported {name} for {class_name!r} ({domain}) -> {paths}")
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


def score(config: ScoreConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Score the input folder; write scores.csv, overlays and the optional report.

    Returns {"rows": [...], "report": dict | None}."""
    calibration_file = config.calibration or calib.calibration_path(config.checkpoint)
    calibration = calib.load_calibration(calibration_file)
    class_name = config.class_name or calibration["class_name"]
    rule = config.rule or calibration["rule"]
    reduction = config.reduction or calibration["reduction"]
    domain = config.domain or calibration["domain"]
    if domain != calibration["domain"]:
        logger.warning(
            "scoring as %s but the thresholds come from %s maps", domain, calibration["domain"]
        )
    files = list_images(config.input)  # an empty folder fails before model loading
    if config.backend == "torch":
        overrides = {**calibration["overrides"], **overrides}
        name, file, model, _ = _load(config, overrides, resolve_device(config.device))
        predictor: AnomalyPredictor | ExportedPredictor = AnomalyPredictor(
            model, domain, config.amp
        )
        checkpoint_sha256 = file_sha256(file)
        scoring_amp = predictor.amp
    else:
        if overrides:
            raise ConfigError(
                f"an export's model and preprocessing are fixed; {sorted(overrides)} cannot "
                "change them: export again with those flags"
            )
        predictor = ExportedPredictor(config.checkpoint, config.backend)
        file, exported = config.checkpoint, predictor.info
        name, checkpoint_sha256 = exported["model"]["name"], exported["model"]["checkpoint_sha256"]
        _check_export(predictor, class_name, domain)
        scoring_amp = "none"  # exports are float32
    if scoring_amp != calibration["amp"]:
        logger.warning(
            "scoring with amp %s but the thresholds come from amp %s maps",
            scoring_amp,
            calibration["amp"],
        )
    _check_calibration(calibration, calibration_file, name, predictor.preprocessing)
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
    )
    stats = calibration["stats"]
    rows: list[dict[str, Any]] = []
    thumbnails: dict[str, str] = {}
    scored: list[tuple[int, float, float]] = []  # (row index, image score, map score)
    for item, result in score_images(
        predictor,
        dataset,
        class_name,
        config.batch_size,
        config.num_workers,
        calibration["top_fraction"],
        config.progress,
    ):
        if result is None:
            logger.warning("unreadable: %s", item.error)
            rows.append(
                {**dict.fromkeys(SCORE_COLUMNS, ""), "file": item.file, "error": item.error}
            )
            continue
        image_score, map_score = result["image_score"], result[reduction]
        decision, fired = calib.decide(
            calibration, np.array([image_score]), np.array([map_score]), rule, reduction
        )
        rows.append(
            {
                "file": item.file,
                "image_score": f"{image_score:.8g}",
                "image_z": f"{calib.z_score(image_score, stats['image']):.6g}",
                "map_score": f"{map_score:.8g}",
                "map_z": f"{calib.z_score(map_score, stats[reduction]):.6g}",
                "decision": "anomalous" if decision[0] else "normal",
                "fired": fired[0],
                "error": "",
            }
        )
        scored.append((len(rows) - 1, image_score, map_score))
        thumbnails[item.file] = f"thumbnails/{item.file}.png"
        save_thumbnail(config.out / thumbnails[item.file], item.original)
        if config.overlays:
            _save_overlay(
                config.out / "overlays" / f"{item.file}.png",
                item,
                result["anomaly_map"],
                calibration,
            )
    _write_csv(config.out / "scores.csv", rows)
    errors = sum(1 for row in rows if row["error"])
    anomalous = sum(1 for row in rows if row["decision"] == "anomalous")
    print(
        f"scored {len(scored)} of {len(rows)} files: {anomalous} anomalous "
        f"(rule {rule}, {reduction}), {errors} unreadable -> {config.out / 'scores.csv'}"
    )
    report, labelled = None, None
    if config.labels is not None:
        report, curves = _report(
            config, calibration_file, rows, scored, rule, reduction, calibration
        )
        labelled = {"report": report, "curves": curves}
    review = {"backend": config.backend, "rule": rule, "reduction": reduction}
    review |= {
        "class_name": class_name,
        "domain": domain,
        "preprocessing": f"{preprocessing.geometry} ({preprocessing.backend} resize)",
    }
    page = write_review(config.out, rows, calibration, review, thumbnails, labelled)
    logger.info("review page: %s", page)
    return {"rows": rows, "report": report}


def _report(
    config: ScoreConfig,
    calibration_file: Path,
    rows: list[dict[str, Any]],
    scored: list[tuple[int, float, float]],
    rule: str,
    reduction: str,
    calibration: dict,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """report.json / report.md; returns the report and the review page's ROC curves."""
    labels = read_labels(config.labels, [rows[index]["file"] for index, _, _ in scored])
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
    body = json.dumps(report, indent=2, default=str) + "\n"
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
    return report, curves
