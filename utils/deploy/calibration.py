"""Thresholds from normal images, decisions, and evaluation with image labels only (predict.py
calibrate and score).

Calibration: per normal image the image score `s_img` and reductions of the anomaly map over valid
pixels (`max`: sensitive to thin line defects; `topk_mean`: mean of the top `top_fraction` of the
valid pixels, at least one, more robust to noise). Each threshold is `numpy.percentile(scores, p)`
with numpy's default linear interpolation (p = 99.5 by default; 99.9 gives fewer false alarms and
more misses; any p in [0, 100] is accepted). Recommended sizes: N >= 200 for p99.5, N >= 1000 for
p99.9. A score is anomalous when it is strictly above its threshold.

Normalised scores are z-scores `(x - mean) / std` with the normal set's mean and population std
(ddof 0). Heat maps for overlays use one fixed scale for every image: the median over normal
images of their mean valid pixel maps to 0, the pixel threshold on the map maximum to 0.5, so
colours above the middle of the colour map mark pixels above anything normal images reach at p.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from datasets.preprocessing import Preprocessing
from datasets.tiling import is_tiling
from utils.core.checkpoint import atomic_write
from utils.core.errors import CheckpointError, ConfigError, DataError
from utils.evaluation.metrics import auroc, average_precision
from utils.inference.source import Opened, tiling_flags

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the predictor's exact preprocessing, class, domain, overrides
REDUCTIONS = ("max", "topk_mean")
RULES = ("image", "pixel", "either", "both")
REPORTED_PERCENTILES = (95.0, 99.0, 99.5, 99.7, 99.9)
DEFAULT_FPR_TARGETS = (0.01, 0.05)


def reduce_maps(
    anomaly_map: torch.Tensor, valid_mask: torch.Tensor, top_fraction: float = 0.01
) -> dict[str, np.ndarray]:
    """Reductions over valid pixels only: anomaly_map `[B, S, S]`, valid_mask `[B, S, S]` bool ->
    {"max", "topk_mean", "mean"} each `[B]` float64 (`mean` feeds the heat-map scale)."""
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(f"--top_fraction {top_fraction} is outside (0, 1]; use e.g. 0.01")
    out: dict[str, list[float]] = {"max": [], "topk_mean": [], "mean": []}
    for values, valid in zip(anomaly_map.float(), valid_mask.bool(), strict=True):
        pixels = values[valid].double()  # [n_valid]
        if pixels.numel() == 0:
            raise DataError("an image has no valid pixel; check the letterbox settings")
        top = max(1, math.ceil(top_fraction * pixels.numel()))
        out["max"].append(pixels.max().item())
        out["topk_mean"].append(torch.topk(pixels, top).values.mean().item())
        out["mean"].append(pixels.mean().item())
    return {name: np.asarray(values, dtype=np.float64) for name, values in out.items()}


def score_stats(scores: np.ndarray, percentile: float) -> dict[str, Any]:
    """Statistics of normal scores `[N]`: count, mean, std (ddof 0), median, IQR, min, max and
    percentiles (REPORTED_PERCENTILES and `percentile`, linear interpolation)."""
    scores = np.asarray(scores, dtype=np.float64)
    points = sorted({*REPORTED_PERCENTILES, float(percentile)})
    q1, median, q3 = np.percentile(scores, [25, 50, 75])
    return {
        "count": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "median": float(median),
        "iqr": float(q3 - q1),
        "min": float(scores.min()),
        "max": float(scores.max()),
        "percentiles": {f"{p:g}": float(np.percentile(scores, p)) for p in points},
    }


def calibrate(
    image_scores: np.ndarray,
    map_reductions: dict[str, np.ndarray],
    percentile: float = 99.5,
    reduction: str = "max",
    top_fraction: float = 0.01,
    rule: str = "image",
) -> dict[str, Any]:
    """Thresholds and statistics from normal images: image_scores `[N]`, map_reductions from
    `reduce_maps` (each `[N]`). Returns the calibration dict's numeric part."""
    check_settings(percentile, reduction, rule)
    image_scores = np.asarray(image_scores, dtype=np.float64)
    if image_scores.size == 0:
        raise DataError("no normal image could be scored; check --normal_dir")
    if image_scores.size < 200:
        logger.warning(
            "%d normal images: a p%g threshold rests on very few of them (N >= 200 advised)",
            image_scores.size,
            percentile,
        )
    series = {"image": image_scores, **{name: map_reductions[name] for name in REDUCTIONS}}
    stats = {name: score_stats(values, percentile) for name, values in series.items()}
    stats["mean"] = score_stats(map_reductions["mean"], percentile)
    for name, values in stats.items():
        if values["std"] == 0:
            logger.warning("normal %s scores are constant: their z-scores use std 1", name)
    return {
        "percentile": float(percentile),
        "interpolation": "linear (numpy.percentile default)",
        "rule": rule,
        "reduction": reduction,
        "top_fraction": float(top_fraction),
        "thresholds": {
            name: float(np.percentile(values, percentile)) for name, values in series.items()
        },
        "stats": stats,
    }


def check_settings(percentile: float, reduction: str, rule: str) -> None:
    """Raise ConfigError for a percentile outside [0, 100] or an unknown reduction/rule."""
    if not 0.0 <= percentile <= 100.0:
        raise ConfigError(f"--percentile {percentile} is outside [0, 100]; use e.g. 99.5 or 99.9")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown --reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if rule not in RULES:
        raise ConfigError(f"unknown --rule {rule!r}; valid: {', '.join(RULES)}")


def z_score(scores: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """`(x - mean) / std` with a normal set's statistics (std 1 when they were constant)."""
    std = stats["std"] if stats["std"] > 0 else 1.0
    return (np.asarray(scores, dtype=np.float64) - stats["mean"]) / std


def decide(
    calibration: dict[str, Any],
    image_scores: np.ndarray,
    map_scores: np.ndarray,
    rule: str | None = None,
    reduction: str | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Decisions `[N]` bool under `rule` (default: the calibration's) and, per image, which
    comparisons fired: "image", "pixel", "both" or "none". map_scores `[N]` are the
    `reduction` of each map (default: the calibration's)."""
    rule = rule or calibration["rule"]
    reduction = reduction or calibration["reduction"]
    check_settings(calibration["percentile"], reduction, rule)
    thresholds = calibration["thresholds"]
    image_fired = np.asarray(image_scores, dtype=np.float64) > thresholds["image"]
    pixel_fired = np.asarray(map_scores, dtype=np.float64) > thresholds[reduction]
    decisions = {
        "image": image_fired,
        "pixel": pixel_fired,
        "either": image_fired | pixel_fired,
        "both": image_fired & pixel_fired,
    }[rule]
    names = {(True, True): "both", (True, False): "image", (False, True): "pixel"}
    fired = [
        names.get((bool(i), bool(p)), "none") for i, p in zip(image_fired, pixel_fired, strict=True)
    ]
    return decisions, fired


def heat(anomaly_map: np.ndarray, calibration: dict[str, Any]) -> np.ndarray:
    """anomaly_map `[H, W]` -> `[H, W]` in [0, 1] on the calibration's fixed scale: normal
    pixel level (median of normal images' mean valid pixel) -> 0, pixel max threshold -> 0.5."""
    low = calibration["stats"]["mean"]["median"]
    mid = calibration["thresholds"]["max"]
    span = mid - low if mid > low else 1e-12
    return np.clip(0.5 * (np.asarray(anomaly_map, dtype=np.float64) - low) / span, 0.0, 1.0)


def files_digest(names: list[str]) -> str:
    """SHA-256 of the sorted relative file names, one per line: identifies the calibration set."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def now() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def calibration_path(checkpoint: Path | str) -> Path:
    """`<folder>/calibration.json` for a save path, `<stem>.calibration.json` beside a file."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint / "calibration.json"
    return checkpoint.with_name(f"{checkpoint.stem}.calibration.json")


def save_calibration(path: Path | str, calibration: dict[str, Any]) -> Path:
    """Write the calibration JSON atomically."""
    path = Path(path)
    text = json.dumps({"format": FORMAT_VERSION, **calibration}, indent=2, default=str) + "\n"
    atomic_write(path, lambda file: file.write(text), mode="w")
    return path


def load_calibration(path: Path | str) -> dict[str, Any]:
    """Read a calibration JSON written by `save_calibration`, checked whole (`check_calibration`)
    before any image is scored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no calibration at {path}; run `predict.py calibrate` first")
    try:
        calibration = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a calibration JSON ({reason}); recalibrate") from None
    if not isinstance(calibration, dict) or calibration.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a calibration of format {FORMAT_VERSION}; recalibrate"
        )
    check_calibration(calibration, path)
    try:
        json.dumps(calibration, allow_nan=False)
    except ValueError:
        raise CheckpointError(f"{path} holds NaN or Infinity; recalibrate") from None
    return calibration


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_calibration(calibration: dict[str, Any], path: Path | str) -> None:
    """Every key `score` and `export` read, with its type: finite thresholds and statistics,
    known rule, reduction and percentile, the preprocessing, tiling, model and graph records.
    A CheckpointError names the first key that is wrong."""

    def fail(key: str, expected: str) -> NoReturn:
        raise CheckpointError(
            f"{path}: {key} is {_shown(calibration, key)}, not {expected}; recalibrate with "
            "predict.py calibrate (a hand-edited calibration cannot decide)"
        )

    def need(key: str, valid: Any, expected: str, optional: bool = False) -> None:
        try:
            value = _at(calibration, key)
        except (KeyError, TypeError):
            if optional:  # written before the key was recorded: read as None
                return
            fail(key, expected)
        if not valid(value):
            fail(key, expected)

    number = "a finite number"
    need("percentile", lambda v: _finite(v) and 0 <= v <= 100, "a number in [0, 100]")
    need("rule", lambda v: v in RULES, f"one of {', '.join(RULES)}")
    need("reduction", lambda v: v in REDUCTIONS, f"one of {', '.join(REDUCTIONS)}")
    need("top_fraction", lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]")
    for name in ("image", *REDUCTIONS):
        need(f"thresholds.{name}", _finite, number)
    for name in ("image", *REDUCTIONS, "mean"):
        for key in ("mean", "median"):
            need(f"stats.{name}.{key}", _finite, number)
        need(f"stats.{name}.std", lambda v: _finite(v) and v >= 0, "a finite number >= 0")
    need("class_name", lambda v: isinstance(v, str) and v, "a class name")
    need("domain", lambda v: isinstance(v, str), "a domain name")
    need("amp", lambda v: isinstance(v, str), "an autocast name")
    need("overrides", lambda v: isinstance(v, dict), "a dict of model settings")
    need("model.name", lambda v: isinstance(v, str), "a model name")
    need("model.checkpoint_sha256", lambda v: v is None or isinstance(v, str), "a SHA-256")
    need("tiling", lambda v: v is None or is_tiling(v), "null or {tile, overlap, scale}", True)
    need("graph", lambda v: v is None or _is_graph(v), "a graph record (backend, export_id)", True)
    try:
        Preprocessing.from_dict(calibration.get("preprocessing"), str(path))
    except ConfigError as error:
        raise CheckpointError(f"{error}; recalibrate") from None


def _at(record: dict[str, Any], key: str) -> Any:
    """`record["a"]["b"]` for key "a.b"."""
    value: Any = record
    for part in key.split("."):
        value = value[part]
    return value


def _shown(record: dict[str, Any], key: str) -> str:
    try:
        return repr(_at(record, key))[:60]
    except (KeyError, TypeError):
        return "missing"


def _is_graph(value: Any) -> bool:
    if not isinstance(value, dict) or value.get("backend") not in (
        "torch",
        "onnxruntime",
        "openvino",
    ):
        return False
    exported = value["backend"] != "torch"
    return not exported or all(
        isinstance(value.get(key), str) for key in ("export_id", "precision")
    )


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Highest TPR on the ROC curve (decision `score >= t`) with FPR <= `fpr`; NaN with one
    class only. scores `[N]`, labels `[N]` in {0, 1}."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    positives, negatives = np.sort(scores[labels]), np.sort(scores[~labels])
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    best = 0.0
    for threshold in np.unique(scores):
        false_rate = (negatives.size - np.searchsorted(negatives, threshold)) / negatives.size
        if false_rate <= fpr:
            true_rate = (positives.size - np.searchsorted(positives, threshold)) / positives.size
            best = max(best, true_rate)
    return float(best)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def label_report(
    image_scores: np.ndarray,
    map_scores: np.ndarray,
    decisions: np.ndarray,
    labels: np.ndarray,
    fpr_targets: tuple[float, ...] = DEFAULT_FPR_TARGETS,
) -> dict[str, Any]:
    """Image-label-only evaluation: AUROC, AP and TPR at fixed FPRs of the image
    score and of the map reduction, and the confusion matrix of the calibrated decisions.
    All arguments `[N]`; labels in {0, 1}."""
    labels = np.asarray(labels).astype(bool)
    decisions = np.asarray(decisions).astype(bool)
    ranking = {}
    for name, scores in (("image_score", image_scores), ("map_score", map_scores)):
        ranking[name] = {
            "auroc": auroc(scores, labels),
            "ap": average_precision(scores, labels),
            "tpr_at_fpr": {f"{t:g}": tpr_at_fpr(scores, labels, t) for t in fpr_targets},
        }
    tp = int((decisions & labels).sum())
    fp = int((decisions & ~labels).sum())
    tn = int((~decisions & ~labels).sum())
    fn = int((~decisions & labels).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "count": int(labels.size),
        "positives": int(labels.sum()),
        "negatives": int((~labels).sum()),
        "ranking": ranking,
        "at_thresholds": {
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "fpr": _ratio(fp, fp + tn),
        },
    }


def format_report(report: dict[str, Any], decimals: int = 4) -> str:
    """Markdown tables of a `label_report`."""

    def number(value: float) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.{decimals}f}"

    targets = list(next(iter(report["ranking"].values()))["tpr_at_fpr"])
    header = ["score", "AUROC", "AP", *(f"TPR@FPR{float(t) * 100:g}%" for t in targets)]
    lines = [
        f"{report['count']} labelled images: {report['positives']} anomalous, "
        f"{report['negatives']} normal",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, values in report["ranking"].items():
        row = [name, number(values["auroc"]), number(values["ap"])]
        row += [number(values["tpr_at_fpr"][t]) for t in targets]
        lines.append("| " + " | ".join(row) + " |")
    matrix = report["at_thresholds"]
    lines += [
        "",
        "| at calibrated thresholds | predicted anomalous | predicted normal |",
        "|---|---|---|",
        f"| anomalous | {matrix['tp']} | {matrix['fn']} |",
        f"| normal | {matrix['fp']} | {matrix['tn']} |",
        "",
        f"precision {number(matrix['precision'])}, recall {number(matrix['recall'])}, "
        f"F1 {number(matrix['f1'])}, FPR {number(matrix['fpr'])}",
    ]
    return "\n".join(lines)


def check_compatible(
    calibration: dict[str, Any], path: Path | str, opened: Opened, tiling: dict[str, Any] | None
) -> None:
    """Whether `calibration`'s thresholds fit the maps of `opened` at `tiling`, checked once
    before any image is read: the same graph (a calibration of an export fits that export; one of
    the checkpoint fits it and its fp32 exports), the same model at the same input size, the
    same tiling (a one-line ConfigError otherwise); another amp, preprocessing or checkpoint file
    is a warning."""
    graph = calibration.get("graph") or {"backend": "torch"}
    here = opened.graph
    same_checkpoint = (
        calibration["model"].get("checkpoint_sha256") == opened.provenance["checkpoint_sha256"]
    )
    if here["backend"] == "torch":
        fits, where = graph["backend"] == "torch", "the checkpoint (torch)"
    else:
        fits = graph.get("export_id") == here["export_id"] or (
            graph["backend"] == "torch" and here["precision"] == "fp32" and same_checkpoint
        )
        where = f"this {here['precision']} export"
    if not fits:
        made = (
            "torch"
            if graph["backend"] == "torch"
            else f"a {graph.get('precision')} export {graph.get('export_id', '?')[:12]}"
        )
        raise ConfigError(
            f"{path} was calibrated on {made}, not on {where}: thresholds move with the graph and "
            "its precision; calibrate on it (predict.py calibrate with its --backend and "
            "--checkpoint, or export with --calibration_dir)"
        )
    preprocessing = opened.predictor.preprocessing
    calibrated = Preprocessing.from_dict(calibration["preprocessing"], str(path))
    if opened.name != calibration["model"]["name"] or preprocessing.size != calibrated.size:
        raise ConfigError(
            f"{path} calibrates a {calibration['model']['name']} model at {calibrated.size} px, "
            f"not this {opened.name} at {preprocessing.size} px; recalibrate"
        )
    if calibration.get("tiling") != tiling:
        raise ConfigError(
            f"{path} was calibrated {tiling_flags(calibration.get('tiling'))}, not "
            f"{tiling_flags(tiling)}: thresholds move with the tiling; score with the "
            "calibration's flags or recalibrate"
        )
    if preprocessing != calibrated:
        now, then = preprocessing.to_dict(), calibrated.to_dict()
        differ = {key: (value, then[key]) for key, value in now.items() if value != then[key]}
        logger.warning(
            "scoring with other preprocessing than the thresholds were calibrated with "
            "(now, then): %s",
            differ,
        )
    if opened.predictor.amp != calibration["amp"]:
        logger.warning(
            "scoring with amp %s but the thresholds come from amp %s maps",
            opened.predictor.amp,
            calibration["amp"],
        )
    if not same_checkpoint:
        logger.warning(
            "%s was calibrated with another checkpoint file; thresholds may not fit", opened.file
        )
