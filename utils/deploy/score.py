"""`predict.py score`: score a folder of images with a calibration.

The source's predictor (a checkpoint, or an export's graph) scores the folder through the one
prediction stream, after `calibration.check_compatible` has checked, before any image is read,
that the calibration's thresholds fit its maps. It writes `scores.csv`, one heat-map overlay per
image over the region the model saw, at the image's resolution up to PREVIEW_SIDE px
(`overlays/<folder>/<stem>_overlay.png`, padding cropped away), with `--labels` `report.json` /
`report.md` (no bare NaN: `null`), and the review page `index.html` with its thumbnails
(utils/deploy/review.py). A file that cannot be read, or whose pictures cannot be written,
becomes a row with an error, not a stopped run; rows reach `scores.partial.csv` as they are
scored, so a run stopped by a full disk keeps them; a scores.csv cell a spreadsheet would run as
a formula gets a leading `'`. Names that are not UTF-8 are written with their odd bytes as
`\\xNN` (utils/core/names.py `printable`) in every output, and labels.csv may name them either
way.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datasets.folder import PREVIEW_SIDE, ImageFolder, list_images
from datasets.items import ImageItem
from datasets.preprocessing import ReadConfig
from datasets.tiling import TileConfig
from utils.core.checkpoint import atomic_write, out_of_space, storage_error
from utils.core.config import RUN, setting
from utils.core.errors import DataError, StorageError
from utils.core.names import printable
from utils.core.runtime import resolve_device
from utils.deploy import calibration as calib
from utils.deploy.field import DecisionConfig, FieldConfig, score_images
from utils.deploy.review import (
    Pictures,
    picture_names,
    save_heat_thumbnail,
    save_thumbnail,
    write_review,
)
from utils.evaluation.visualize import overlay
from utils.inference.resolution import at_resolution
from utils.inference.source import field_class, open_predictor

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


@dataclasses.dataclass
class ScoreConfig(TileConfig, ReadConfig, FieldConfig, DecisionConfig):
    """`predict.py score`: score a folder of images with a calibration."""

    input: Path = setting(None, "folder of images to score", kind=RUN, required=True)
    out: Path = setting(None, "output folder", kind=RUN, required=True)
    calibration: Path | None = setting(
        None, "calibration JSON (default: the checkpoint's)", kind=RUN
    )
    labels: Path | None = setting(None, "CSV file,label (0/1) -> report", kind=RUN)
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
    item: ImageItem,
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


def _save_overlay(path: Path, item: ImageItem, anomaly_map: np.ndarray, calibration: dict) -> None:
    """Overlay over the region the model saw, at the preview's resolution (`original`: the
    image's, up to PREVIEW_SIDE px): content rectangle cropped, calibration-scaled heat."""
    geometry = item.picture_geometry()
    heat = calib.heat(geometry.to_original(anomaly_map), calibration)
    left, top, right, bottom = geometry.crop
    picture = Image.fromarray(overlay(item.original[top:bottom, left:right], heat))
    atomic_write(path, lambda file: picture.save(file, format="PNG"))


def score(config: ScoreConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Score the input folder; write scores.csv, overlays and the optional report.

    Returns {"rows": [...], "report": dict | None}."""
    calibration_file = config.calibration or calib.calibration_path(config.checkpoint)
    calibration = calib.load_calibration(calibration_file)
    given_class = config.one_class()
    rule = config.rule or calibration["rule"]
    reduction = config.reduction or calibration["reduction"]
    if config.domain and config.domain != calibration["domain"]:
        logger.warning(
            "scoring as %s but the thresholds come from %s maps",
            config.domain,
            calibration["domain"],
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
    opened = open_predictor(
        config,
        overrides,
        recorded_overrides=calibration["overrides"],
        device=resolve_device(config.device),
        domain=config.domain,
        recorded_domain=calibration["domain"],
        amp=config.amp,
        tiling=config.tiling(),
        trust=config.trust_checkpoint,
    )
    class_name = field_class(given_class, opened, calibration["class_name"])
    opened.predictor.check_classes([class_name])
    calib.check_compatible(calibration, calibration_file, opened, config.tiling())
    predictor = at_resolution(opened.predictor, config, config.batch_size)
    domain = predictor.domain
    preprocessing = predictor.preprocessing
    logger.info(
        "scoring %d files: %s (%s), %s, %s (%s) at %d px, rule=%s, reduction=%s, p%g",
        len(files),
        opened.name,
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
        native=predictor.native,
        max_pixels=config.max_image_pixels,
    )
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
