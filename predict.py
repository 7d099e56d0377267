"""Field deployment: calibrate thresholds on normal images, then score folders of new images.

    python predict.py calibrate --checkpoint ckpt/x --normal_dir field/normal --percentile 99.5
    python predict.py score --checkpoint ckpt/x --input field/incoming --out runs/incoming
    python predict.py score --checkpoint ckpt/x --input field/incoming --out runs/incoming \
        --labels labels.csv

Works for every model in models.registry through `predict` (raw outputs, no test-set
normalisation). `calibrate` writes `<save path>/calibration.json` (or `<stem>.calibration.json`
beside a checkpoint file): thresholds, normal-score statistics, model config, preprocessing and
the data it saw (utils/calibration.py). `score` reuses the calibration's letterbox, pad colour
and class name unless flags override them, and writes `scores.csv`, one heat-map overlay per
image at its original size (`overlays/<file>.png`, padding cropped away) and, with `--labels`,
`report.json` / `report.md`. An unreadable file becomes a row with an error, not a stopped run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
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

from datasets.catalog import CATALOG
from datasets.folder import DEFAULT_PAD_COLOR, FieldImage, ImageFolder, collate, list_images
from models.base import DEFAULT_DOMAIN, FrozenCLIPModel
from models.predictor import DOMAINS, AnomalyPredictor
from models.registry import MODELS, find_checkpoint, load_trained_model
from utils import calibration as calib
from utils.checkpoint import atomic_write, check_writable
from utils.config import HelpFormatter, add_settings
from utils.errors import ConfigError, DataError
from utils.runtime import loader_workers, progress, resolve_device, run_script, setup_logging
from utils.training import RunConfig, set_switches
from utils.visualize import overlay

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


RUN_FLAGS = ("device", "num_workers", "log_level", "trust_checkpoint", "progress")


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint file or training save path"
    )
    parser.add_argument(
        "--model",
        default=None,
        choices=tuple(MODELS),
        help="which model a save path holds (default: the one found there)",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward")
    others = [field.name for field in dataclasses.fields(RunConfig) if field.name not in RUN_FLAGS]
    add_settings(parser, RunConfig, exclude=others)


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
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    set_switches(args)
    if args.pad_color is not None and not all(0 <= value <= 255 for value in args.pad_color):
        raise ConfigError(f"--pad_color {args.pad_color} must be three values in 0-255")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size} must be at least 1")
    return args


def score_images(
    predictor: AnomalyPredictor,
    dataset: ImageFolder,
    class_name: str,
    batch_size: int = 8,
    num_workers: int | None = None,
    top_fraction: float = 0.01,
) -> Iterator[tuple[FieldImage, dict[str, Any] | None]]:
    """Yield (item, result) per file in order; result is None for an unreadable file, else
    {"image_score", "max", "topk_mean", "mean", "anomaly_map" [S, S]} (reductions over valid
    pixels only). Letterboxed images hand their valid mask to the model (FE-CLIP's masked LFS)."""
    workers = loader_workers(num_workers, predictor.device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    for batch in progress(loader, desc="scoring", unit="batch", leave=False):
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(
    args: argparse.Namespace, device: torch.device
) -> tuple[str, Path, FrozenCLIPModel, dict]:
    name, file = find_checkpoint(args.checkpoint, args.model)
    _, model, payload = load_trained_model(file, device, name)
    return name, file, model, payload


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
    predictor = AnomalyPredictor(model, domain)
    dataset = ImageFolder(
        args.normal_dir, model.img_size, letterbox, pad_color, files=dataset_files
    )
    image_scores: list[float] = []
    reductions: dict[str, list[float]] = {key: [] for key in ("max", "topk_mean", "mean")}
    used: list[str] = []
    skipped: list[dict[str, str]] = []
    for item, result in score_images(
        predictor, dataset, class_name, args.batch_size, args.num_workers, args.top_fraction
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
            "model": {
                "name": name,
                "checkpoint": str(file.resolve()),
                "checkpoint_sha256": _file_sha256(file),
                "epoch": payload.get("epoch"),
                "config": payload.get("config"),
            },
            "preprocessing": {
                "img_size": model.img_size,
                "letterbox": letterbox,
                "pad_color": list(pad_color),
                "class_name": class_name,
                "domain": domain,
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
    device = resolve_device(args.device)
    name, file, model, _ = _load(args, device)
    predictor = AnomalyPredictor(model, domain)
    if name != calibration["model"]["name"] or model.img_size != settings["img_size"]:
        raise ConfigError(
            f"{calibration_file} calibrates a {calibration['model']['name']} model at "
            f"{settings['img_size']} px, not this {name} at {model.img_size} px; recalibrate"
        )
    if _file_sha256(file) != calibration["model"].get("checkpoint_sha256"):
        logger.warning(
            "%s was calibrated with another checkpoint file; thresholds may not fit", file
        )
    logger.info(
        "scoring %d files: %s, %s, letterbox=%s, rule=%s, reduction=%s, p%g",
        len(files),
        name,
        domain,
        letterbox,
        rule,
        reduction,
        calibration["percentile"],
    )
    dataset = ImageFolder(
        args.input,
        model.img_size,
        letterbox,
        pad_color,
        keep_original=not args.no_overlays,
        files=files,
    )
    stats = calibration["stats"]
    rows: list[dict[str, Any]] = []
    scored: list[tuple[int, float, float]] = []  # (row index, image score, map score)
    for item, result in score_images(
        predictor,
        dataset,
        class_name,
        args.batch_size,
        args.num_workers,
        calibration["top_fraction"],
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
    report = None
    if args.labels is not None:
        report = _report(args, calibration_file, rows, scored, rule, reduction, calibration)
    return {"rows": rows, "report": report}


def _report(
    args: argparse.Namespace,
    calibration_file: Path,
    rows: list[dict[str, Any]],
    scored: list[tuple[int, float, float]],
    rule: str,
    reduction: str,
    calibration: dict,
) -> dict[str, Any]:
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
    return report


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def body() -> None:
        args = parse_args(argv)
        if args.command == "score":
            check_writable(args.out, "--out")  # before any work
        setup_logging(args.out / "predict.log" if args.command == "score" else None, args.log_level)
        if args.command == "calibrate":
            run_calibrate(args)
        else:
            run_score(args)

    return run_script(body, logger)


if __name__ == "__main__":
    raise SystemExit(main())
