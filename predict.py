"""Field deployment: calibrate thresholds on normal images, then score folders of new images.

    python predict.py calibrate --checkpoint ckpt/x --normal_dir field/normal --percentile 99.5
    python predict.py score --checkpoint ckpt/x --input field/incoming --out runs/incoming
    python predict.py score --checkpoint ckpt/x --input field/incoming --out runs/incoming \
        --labels labels.csv
    python predict.py export --checkpoint ckpt/x --format onnx --out deploy/x
    python predict.py score --backend onnxruntime --checkpoint deploy/x --input field/incoming \
        --out runs/incoming

Works for every model in models.registry through `predict` (raw outputs, no test-set
normalisation). `calibrate` writes `<save path>/calibration.json` (or `<stem>.calibration.json`
beside a checkpoint file): thresholds, normal-score statistics, model config, preprocessing and
the data it saw (utils/deploy/calibration.py). `score` reuses the calibration's letterbox, pad
colour and class name unless flags override them, and writes `scores.csv`, one heat-map overlay
per image at its original size (`overlays/<file>.png`, padding cropped away) and, with
`--labels`, `report.json` / `report.md`, and the review page `index.html` (utils/deploy/review.py).
An unreadable file becomes a row with an error, not a stopped run. `export` writes a graph that
runs without this code (utils/deploy/export.py); `score --backend onnxruntime|openvino` scores
with it, the same way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.catalog import CATALOG, DEFAULT_DOMAIN, DOMAINS
from datasets.folder import DEFAULT_PAD_COLOR, FieldImage, ImageFolder, collate, list_images
from models.base import FrozenCLIPModel
from models.predictor import AnomalyPredictor
from models.registry import MODELS, find_checkpoint, load_trained_model
from utils.core.checkpoint import atomic_write, check_writable, file_sha256
from utils.core.config import HelpFormatter, add_settings
from utils.core.errors import ConfigError, DataError
from utils.core.runtime import (
    RuntimeConfig,
    loader_workers,
    progress,
    resolve_device,
    run_script,
    setup_logging,
)
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


RUN_FLAGS = ("device", "num_workers", "amp", "log_level", "trust_checkpoint", "progress")


def _add_common_args(parser: argparse.ArgumentParser, batches: bool = True) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint file or training save path (--backend onnxruntime/openvino: the export)",
    )
    parser.add_argument(
        "--model",
        default=None,
        choices=tuple(MODELS),
        help="which model a save path holds (default: the one found there)",
    )
    flags = RUN_FLAGS
    if batches:
        parser.add_argument("--batch_size", type=int, default=8, help="images per forward")
    else:  # export: traced on the CPU in float32, no images loaded
        flags = tuple(flag for flag in RUN_FLAGS if flag not in ("device", "num_workers", "amp"))
    others = [field.name for field in dataclasses.fields(RuntimeConfig) if field.name not in flags]
    add_settings(parser, RuntimeConfig, exclude=others)


def _add_preprocessing_args(parser: argparse.ArgumentParser, defaults_from: str) -> None:
    parser.add_argument(
        "--letterbox",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"keep the aspect ratio and pad (default: {defaults_from})",
    )
    parser.add_argument(
        "--pad_color",
        type=int,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help=f"letterbox pad colour, 0-255 (default: {defaults_from})",
    )
    parser.add_argument(
        "--class_name", default=None, help=f"prompt name of the object (default: {defaults_from})"
    )
    parser.add_argument(
        "--domain",
        default=None,
        choices=DOMAINS,
        help=f"the images' domain, e.g. AA-CLIP's blur (default: {defaults_from})",
    )


def build_parser() -> argparse.ArgumentParser:
    """predict.py's two commands and their flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    cal = commands.add_parser(
        "calibrate", help="thresholds from a folder of normal images", formatter_class=HelpFormatter
    )
    _add_common_args(cal)
    _add_preprocessing_args(cal, "off, 255 255 255, 'object', the training data set's domain")
    cal.add_argument("--normal_dir", type=Path, required=True, help="folder of normal images")
    cal.add_argument(
        "--percentile", type=float, default=99.5, help="99.5 (more sensitive) or 99.9, any p"
    )
    cal.add_argument("--reduction", default="max", choices=calib.REDUCTIONS, help="pixel rule map")
    cal.add_argument(
        "--top_fraction", type=float, default=0.01, help="topk_mean: fraction of valid pixels"
    )
    cal.add_argument("--rule", default="image", choices=calib.RULES, help="default decision rule")
    cal.add_argument(
        "--output", type=Path, default=None, help="calibration file (default: beside checkpoint)"
    )

    score = commands.add_parser(
        "score", help="score a folder of images with a calibration", formatter_class=HelpFormatter
    )
    _add_common_args(score)
    _add_preprocessing_args(score, "the calibration's")
    score.add_argument("--input", type=Path, required=True, help="folder of images to score")
    score.add_argument("--out", type=Path, required=True, help="output folder")
    score.add_argument("--calibration", type=Path, default=None, help="calibration JSON")
    score.add_argument("--labels", type=Path, default=None, help="CSV file,label (0/1) -> report")
    score.add_argument("--rule", default=None, choices=calib.RULES, help="override the rule")
    score.add_argument(
        "--reduction", default=None, choices=calib.REDUCTIONS, help="override the reduction"
    )
    score.add_argument(
        "--fpr_targets",
        type=float,
        nargs="+",
        default=list(calib.DEFAULT_FPR_TARGETS),
        help="with --labels: the report's TPR at these FPRs",
    )
    score.add_argument("--no_overlays", action="store_true", help="skip the heat-map overlays")
    score.add_argument(
        "--backend",
        default="torch",
        choices=BACKENDS,
        help="torch: the checkpoint; onnxruntime, openvino: a `predict.py export` folder",
    )

    export = commands.add_parser(
        "export",
        help="a graph that runs without this code (ONNX or OpenVINO)",
        formatter_class=HelpFormatter,
    )
    _add_common_args(export, batches=False)
    _add_preprocessing_args(export, "the calibration's, else off, 255 255 255, 'object'")
    export.add_argument(
        "--format",
        nargs="+",
        default=["onnx"],
        choices=FORMATS,
        help="graph formats, written from one trace (openvino: model.xml + model.bin)",
    )
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument(
        "--img_size", type=int, default=None, help="input side (default and only: the model's)"
    )
    export.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="thresholds to ship beside the graph (default: the checkpoint's, when there is one)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.pad_color is not None and not all(0 <= value <= 255 for value in args.pad_color):
        raise ConfigError(f"--pad_color {args.pad_color} must be three values in 0-255")
    if getattr(args, "batch_size", 1) < 1:
        raise ConfigError(f"--batch_size {args.batch_size} must be at least 1")
    return args


def score_images(
    predictor: AnomalyPredictor,
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
            mask = valid if dataset.use_letterbox else None
            anomaly_map, image_score = predictor.predict(images, [class_name] * len(good), mask)
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
    args: argparse.Namespace, device: torch.device
) -> tuple[str, Path, FrozenCLIPModel, dict]:
    name, file = find_checkpoint(args.checkpoint, args.model, args.trust_checkpoint)
    _, model, payload = load_trained_model(file, device, name, trust=args.trust_checkpoint)
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


def run_calibrate(args: argparse.Namespace) -> Path:
    """Score the normal folder, write the calibration JSON; returns its path."""
    calib.check_settings(args.percentile, args.reduction, args.rule)
    device = resolve_device(args.device)
    letterbox = bool(args.letterbox)
    pad_color = tuple(args.pad_color or DEFAULT_PAD_COLOR)
    class_name = args.class_name or "object"
    dataset_files = list_images(args.normal_dir)  # an empty folder fails before model loading
    path = args.output or calib.calibration_path(args.checkpoint)
    check_writable(Path(path).parent, "--output")
    name, file, model, payload = _load(args, device)
    domain = args.domain or training_domain(payload)
    predictor = AnomalyPredictor(model, domain, args.amp)
    dataset = ImageFolder(
        args.normal_dir, model.img_size, letterbox, pad_color, files=dataset_files
    )
    image_scores: list[float] = []
    reductions: dict[str, list[float]] = {key: [] for key in ("max", "topk_mean", "mean")}
    used: list[str] = []
    skipped: list[dict[str, str]] = []
    for item, result in score_images(
        predictor,
        dataset,
        class_name,
        args.batch_size,
        args.num_workers,
        args.top_fraction,
        args.progress,
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
        raise DataError(f"no image under {args.normal_dir} could be read; see the log")
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
        args.percentile,
        args.reduction,
        args.top_fraction,
        args.rule,
    )
    calibration.update(
        {
            "created": calib.now(),
            "model": _provenance(name, file, payload),
            "preprocessing": {
                "img_size": model.img_size,
                "letterbox": letterbox,
                "pad_color": list(pad_color),
                "class_name": class_name,
                "domain": domain,
                "amp": predictor.amp,
                "valid_mask_to_model": letterbox,
            },
            "data": {
                "folder": str(Path(args.normal_dir).resolve()),
                "count": len(used),
                "files_sha256": calib.files_digest(used),
                "skipped": skipped,
            },
        }
    )
    calib.save_calibration(path, calibration)
    thresholds = calibration["thresholds"]
    print(
        f"calibrated on {len(used)} normal images (p{args.percentile:g}): "
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
    """Overlay at the original size: content rectangle cropped, calibration-scaled heat."""
    heat = calib.heat(item.geometry.to_original(anomaly_map), calibration)
    picture = Image.fromarray(overlay(item.original, heat))
    atomic_write(path, lambda file: picture.save(file, format="PNG"))


def _check_export(
    exported: dict[str, Any],
    class_name: str,
    domain: str,
    letterbox: bool,
    pad_color: tuple[int, ...],
) -> None:
    """An export scores the class, domain and letterbox it was traced for: refuse others."""
    baked = exported["preprocessing"]
    asked = {"class_name": class_name, "domain": domain, "letterbox": letterbox}
    for key, value in asked.items():
        if baked[key] != value:
            flag = f"--{key} {value}" if key != "letterbox" else ("--letterbox" if value else "")
            raise ConfigError(
                f"the export holds {key}={baked[key]!r}, not {value!r}; export again with "
                f"{flag or '--no-letterbox'} or score with its own"
            )
    if list(pad_color) != baked["pad_color"]:
        logger.warning(
            "letterbox pad %s; the export was made for %s", list(pad_color), baked["pad_color"]
        )


def run_export(args: argparse.Namespace) -> dict[str, Path]:
    """Write the export folder; returns {format: graph path}."""
    check_writable(args.out, "--out")
    calibration_file = args.calibration or calib.calibration_path(args.checkpoint)
    calibration = None
    if args.calibration is not None or Path(calibration_file).is_file():
        calibration = calib.load_calibration(calibration_file)
    settings = (calibration or {}).get("preprocessing", {})
    name, file, model, payload = _load(args, torch.device("cpu"))
    if args.img_size is not None and args.img_size != model.img_size:
        raise ConfigError(
            f"--img_size {args.img_size}: this {name} was trained at {model.img_size} px, an "
            f"architectural setting; export at {model.img_size} (or train at {args.img_size})"
        )
    letterbox = settings.get("letterbox", False) if args.letterbox is None else args.letterbox
    pad_color = tuple(args.pad_color or settings.get("pad_color", DEFAULT_PAD_COLOR))
    class_name = args.class_name or settings.get("class_name", "object")
    domain = args.domain or settings.get("domain") or training_domain(payload)
    info = {
        "model": _provenance(name, file, payload),
        "created": calib.now(),
        "calibration": None,
    }
    if calibration is not None:
        info["calibration"] = {
            key: calibration[key]
            for key in ("thresholds", "percentile", "rule", "reduction", "top_fraction")
        }
    targets = export_graph(
        model, args.out, args.format, class_name, domain, letterbox, pad_color, info
    )
    if calibration is not None:  # score --backend finds it where it looks for a save path's
        calib.save_calibration(args.out / "calibration.json", calibration)
    paths = ", ".join(str(path) for path in targets.values())
    print(f"exported {name} for {class_name!r} ({domain}) -> {paths}")
    return targets


def run_score(args: argparse.Namespace) -> dict[str, Any]:
    """Score the input folder; write scores.csv, overlays and the optional report.

    Returns {"rows": [...], "report": dict | None}."""
    calibration_file = args.calibration or calib.calibration_path(args.checkpoint)
    calibration = calib.load_calibration(calibration_file)
    settings = calibration["preprocessing"]
    letterbox = settings["letterbox"] if args.letterbox is None else args.letterbox
    pad_color = tuple(args.pad_color or settings["pad_color"])
    class_name = args.class_name or settings["class_name"]
    rule = args.rule or calibration["rule"]
    reduction = args.reduction or calibration["reduction"]
    # Calibrations written before the domain was recorded were scored as industrial.
    calibrated_domain = settings.get("domain", DEFAULT_DOMAIN)
    domain = args.domain or calibrated_domain
    if domain != calibrated_domain:
        logger.warning(
            "scoring as %s but the thresholds come from %s maps", domain, calibrated_domain
        )
    if (letterbox, list(pad_color)) != (settings["letterbox"], settings["pad_color"]):
        logger.warning(
            "scoring with letterbox=%s pad %s but the thresholds come from letterbox=%s pad %s",
            letterbox,
            list(pad_color),
            settings["letterbox"],
            settings["pad_color"],
        )
    files = list_images(args.input)  # an empty folder fails before model loading
    if args.backend == "torch":
        name, file, model, _ = _load(args, resolve_device(args.device))
        predictor: AnomalyPredictor | ExportedPredictor = AnomalyPredictor(model, domain, args.amp)
        img_size, checkpoint_sha256 = model.img_size, file_sha256(file)
    else:
        predictor = ExportedPredictor(args.checkpoint, args.backend)
        file, exported = args.checkpoint, predictor.info
        name, checkpoint_sha256 = exported["model"]["name"], exported["model"]["checkpoint_sha256"]
        img_size = exported["preprocessing"]["img_size"]
        _check_export(exported, class_name, domain, letterbox, pad_color)
    scoring_amp = predictor.amp if args.backend == "torch" else "none"  # exports are float32
    if scoring_amp != settings.get("amp", "none"):
        logger.warning(
            "scoring with amp %s but the thresholds come from amp %s maps",
            scoring_amp,
            settings.get("amp", "none"),
        )
    if name != calibration["model"]["name"] or img_size != settings["img_size"]:
        raise ConfigError(
            f"{calibration_file} calibrates a {calibration['model']['name']} model at "
            f"{settings['img_size']} px, not this {name} at {img_size} px; recalibrate"
        )
    if checkpoint_sha256 != calibration["model"].get("checkpoint_sha256"):
        logger.warning(
            "%s was calibrated with another checkpoint file; thresholds may not fit", file
        )
    logger.info(
        "scoring %d files: %s (%s), %s, letterbox=%s, rule=%s, reduction=%s, p%g",
        len(files),
        name,
        args.backend,
        domain,
        letterbox,
        rule,
        reduction,
        calibration["percentile"],
    )
    dataset = ImageFolder(
        args.input,
        img_size,
        letterbox,
        pad_color,
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
        args.batch_size,
        args.num_workers,
        calibration["top_fraction"],
        args.progress,
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
        save_thumbnail(args.out / thumbnails[item.file], item.original)
        if not args.no_overlays:
            _save_overlay(
                args.out / "overlays" / f"{item.file}.png", item, result["anomaly_map"], calibration
            )
    _write_csv(args.out / "scores.csv", rows)
    errors = sum(1 for row in rows if row["error"])
    anomalous = sum(1 for row in rows if row["decision"] == "anomalous")
    print(
        f"scored {len(scored)} of {len(rows)} files: {anomalous} anomalous "
        f"(rule {rule}, {reduction}), {errors} unreadable -> {args.out / 'scores.csv'}"
    )
    report, labelled = None, None
    if args.labels is not None:
        report, curves = _report(args, calibration_file, rows, scored, rule, reduction, calibration)
        labelled = {"report": report, "curves": curves}
    review = {"backend": args.backend, "rule": rule, "reduction": reduction}
    review |= {"class_name": class_name, "domain": domain, "letterbox": letterbox}
    page = write_review(args.out, rows, calibration, review, thumbnails, labelled)
    logger.info("review page: %s", page)
    return {"rows": rows, "report": report}


def _report(
    args: argparse.Namespace,
    calibration_file: Path,
    rows: list[dict[str, Any]],
    scored: list[tuple[int, float, float]],
    rule: str,
    reduction: str,
    calibration: dict,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """report.json / report.md; returns the report and the review page's ROC curves."""
    labels = read_labels(args.labels, [rows[index]["file"] for index, _, _ in scored])
    labelled = [(index, s, m) for index, s, m in scored if rows[index]["file"] in labels]
    if not labelled:
        raise DataError(f"no scored file has a label in {args.labels}; check its file column")
    image_scores = np.array([s for _, s, _ in labelled])
    map_scores = np.array([m for _, _, m in labelled])
    truth = np.array([labels[rows[index]["file"]] for index, _, _ in labelled])
    decisions, _ = calib.decide(calibration, image_scores, map_scores, rule, reduction)
    report = calib.label_report(image_scores, map_scores, decisions, truth, tuple(args.fpr_targets))
    report["settings"] = {
        "calibration": str(Path(calibration_file).resolve()),
        "rule": rule,
        "reduction": reduction,
        "percentile": calibration["percentile"],
        "labels": str(Path(args.labels).resolve()),
        "unlabelled_scored": len(scored) - len(labelled),
    }
    text = calib.format_report(report)
    body = json.dumps(report, indent=2, default=str) + "\n"
    atomic_write(args.out / "report.json", lambda file: file.write(body), mode="w")
    atomic_write(args.out / "report.md", lambda file: file.write(text + "\n"), mode="w")
    print(text)
    curves = {
        name: (scores, truth, report["ranking"][key]["auroc"])
        for name, key, scores in (
            ("image score", "image_score", image_scores),
            ("map score", "map_score", map_scores),
        )
    }
    return report, curves


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def body() -> None:
        args = parse_args(argv)
        if args.command == "score":
            check_writable(args.out, "--out")  # before any work
        setup_logging(args.out / "predict.log" if args.command == "score" else None, args.log_level)
        if args.command == "calibrate":
            run_calibrate(args)
        elif args.command == "export":
            run_export(args)
        else:
            run_score(args)

    return run_script(body, logger)


if __name__ == "__main__":
    raise SystemExit(main())
