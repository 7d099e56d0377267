"""Exact, fast anomaly-detection metrics on numpy arrays.

Every threshold-free metric comes from one routine: the negatives are sorted once, the
positives are grouped by distinct score, and binary searches give the false positives at each
positive score. The results equal sklearn's `roc_auc_score`, `average_precision_score` and
PR-curve F1-max (ties included), and the MVTec AD official AUPRO, without a full argsort.
Undefined metrics (one label only) are NaN plus one logged warning; sklearn is never called.

MVTec AD 2 (Heckler-Kram et al. 2025) adds two columns: AUPRO integrated to FPR 0.05 (its
limit, beside the usual 0.3) and SegF1, the pooled pixel F1 of maps binarised at one threshold
per class chosen without test labels (`ValidationThreshold`, from validation/good maps).
"""

from __future__ import annotations

import logging
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from utils.core.errors import ConfigError

logger = logging.getLogger(__name__)

COLUMNS_FULL = ["P-AUROC", "P-AP", "P-F1max", "AUPRO", "I-AUROC", "I-AP", "I-F1max"]
COLUMNS_OFFICIAL = ["P-AUROC", "P-AP", "I-AUROC", "I-AP"]
# MVTec AD 2's table. "SegF1-oracle" is the F1 at the best threshold on the test maps themselves
# (the value of P-F1max): analysis only, it bounds what a label-free threshold could reach.
COLUMNS_MVTEC_AD2 = ["SegF1", "AUPRO@0.05", "AUPRO", "P-AUROC", "I-AUROC", "SegF1-oracle"]
PRO_VARIANTS = ("exact", "anomalyclip", "sowa")
MVTEC_AD2_FPR_LIMIT = 0.05
# SegF1's threshold: the 99.9th percentile of a class's validation/good pixel scores, so at most
# 0.1 % of normal pixels score above it. The maximum would rest on one pixel of one image (a
# glint or a hair on a single validation image sets the class's threshold), while 0.1 % of
# ~10^8 validation pixels is a tail of ~10^5 pixels, stable from run to run; yet the budget is
# small next to MVTec AD 2's defects, which cover well under 1 % of an image.
DEFAULT_SEG_PERCENTILE = 99.9

_PIXEL_KEYS = {
    "P-AUROC": "auroc",
    "P-AP": "ap",
    "P-F1max": "f1_max",
    "AUPRO": "aupro",
    f"AUPRO@{MVTEC_AD2_FPR_LIMIT:g}": f"aupro@{MVTEC_AD2_FPR_LIMIT:g}",
    "SegF1-oracle": "f1_max",
}
_VALID_COLUMNS = list(dict.fromkeys(COLUMNS_FULL + COLUMNS_MVTEC_AD2))
_IMAGE_KEYS = {"I-AUROC": "auroc", "I-AP": "ap", "I-F1max": "f1_max"}
# 8-connected regions as in the MVTec official code; scipy's default structure is 4-connected
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_ANOMALYCLIP_STEPS = 200


def _to_numpy(x: Any) -> np.ndarray:
    """Array or tensor -> numpy array (half-precision tensors widened exactly to float32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_scores(x: Any, name: str) -> np.ndarray:
    """Scores as float32/float64 (other dtypes widened without changing any order or tie)."""
    scores = _to_numpy(x)
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float32 if scores.dtype == np.float16 else np.float64)
    if np.isnan(scores).any():
        raise ValueError(f"{name} contain NaN; fix the model output before evaluation")
    return scores


def _as_binary(x: Any, name: str) -> np.ndarray:
    """Bool or {0, 1} array -> bool array; anything else is refused (binarise masks once)."""
    arr = _to_numpy(x)
    if arr.dtype != bool:
        if not ((arr == 0) | (arr == 1)).all():
            raise ValueError(f"{name} must be bool or 0/1; binarise them before evaluation")
        arr = arr.astype(bool)
    return arr


def _pixel_batch(
    maps: Any, masks: Any, valid: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checked maps [B, H, W] (float), masks [B, H, W] bool and valid [B, H, W] bool or None;
    a mask may not mark pixels outside the valid region."""
    maps = _as_scores(maps, "maps")
    masks = _as_binary(masks, "masks")
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be [B, H, W]")
    if valid is not None:
        valid = _as_binary(valid, "valid")
        if valid.shape != masks.shape:
            raise ValueError(f"valid {valid.shape} must match masks {masks.shape}")
        if (masks & ~valid).any():
            raise ValueError("a mask marks defect pixels outside the valid region")
    return maps, masks, valid


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _check_variant(pro_variant: str) -> None:
    if pro_variant not in PRO_VARIANTS:
        raise ConfigError(f"unknown pro_variant {pro_variant!r}; valid: {', '.join(PRO_VARIANTS)}")


def _warn_undefined(what: str, num_pos: int, num_neg: int) -> None:
    logger.warning(
        "%s metrics undefined (%d positives, %d negatives); returning NaN", what, num_pos, num_neg
    )


class _Curve(NamedTuple):
    """Cumulative counts at each distinct positive score u_1 > ... > u_K."""

    scores: np.ndarray  # [K] u_k
    tp: np.ndarray  # [K] int64, #positives with score >= u_k
    fp_ge: np.ndarray  # [K] int64, #negatives with score >= u_k
    fp_gt: np.ndarray  # [K] int64, #negatives with score > u_k
    pro: np.ndarray | None  # [K] float64, summed PRO weight of positives with score >= u_k
    num_pos: int
    num_neg: int


def _curve(neg_sorted: np.ndarray, pos: np.ndarray, weights: np.ndarray | None = None) -> _Curve:
    """neg_sorted: [N] ascending; pos: [P] (P > 0); weights: [P] float64 PRO weight per positive."""
    if weights is None:
        pos_desc = np.sort(pos)[::-1]
    else:
        order = np.argsort(pos, kind="stable")[::-1]
        pos_desc = pos[order]
    ends = np.append(np.flatnonzero(pos_desc[1:] != pos_desc[:-1]), pos_desc.size - 1)
    scores = pos_desc[ends]
    num_neg = neg_sorted.size
    pro = None
    if weights is not None:
        pro = np.minimum(np.cumsum(weights[order])[ends], 1.0)
    return _Curve(
        scores=scores,
        tp=(ends + 1).astype(np.int64),
        fp_ge=num_neg - np.searchsorted(neg_sorted, scores, side="left").astype(np.int64),
        fp_gt=num_neg - np.searchsorted(neg_sorted, scores, side="right").astype(np.int64),
        pro=pro,
        num_pos=pos.size,
        num_neg=num_neg,
    )


def _curve_auroc(curve: _Curve) -> float:
    """Mann-Whitney with ties as 1/2; the numerator stays exact in int64."""
    d_tp = np.diff(curve.tp, prepend=0)
    below = curve.num_neg - curve.fp_ge
    ties = curve.fp_ge - curve.fp_gt
    numerator = 2 * int(np.dot(d_tp, below)) + int(np.dot(d_tp, ties))
    return numerator / (2 * curve.num_pos * curve.num_neg)


def _curve_ap(curve: _Curve) -> float:
    """sklearn step sum: sum_k (R_k - R_{k-1}) * Prec_k."""
    d_tp = np.diff(curve.tp, prepend=0)
    return float(np.sum(d_tp / curve.num_pos * (curve.tp / (curve.tp + curve.fp_ge))))


def _curve_f1_max(curve: _Curve) -> float:
    """max_k 2 TP / (TP + FP + P), reached at a distinct positive score."""
    return float(np.max(2 * curve.tp / (curve.tp + curve.fp_ge + curve.num_pos)))


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid of pro(fpr) on [0, limit], interpolating at limit (MVTec `trapezoid`).

    fpr: [M] non-decreasing from 0 to 1; pro: [M].
    """
    n = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:n], pro[:n]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2)
    if x[-1] < limit:
        y_limit = y[-1] + (pro[n] - y[-1]) * (limit - x[-1]) / (fpr[n] - x[-1])
        area += float(0.5 * (y[-1] + y_limit) * (limit - x[-1]))
    return area


def _curve_aupro(curve: _Curve, fpr_limit: float) -> float:
    """Exact MVTec AUPRO: (0,0), then (FP>_k/N, PRO_{k-1}), (FP>=_k/N, PRO_k) per k, then (1,1)."""
    num_points = 2 * curve.scores.size + 2
    fpr = np.empty(num_points)
    pro = np.empty(num_points)
    fpr[0] = pro[0] = 0.0
    fpr[-1] = pro[-1] = 1.0
    fpr[1:-1:2] = curve.fp_gt / curve.num_neg
    pro[1:-1:2] = np.concatenate(([0.0], curve.pro[:-1]))
    fpr[2:-1:2] = curve.fp_ge / curve.num_neg
    pro[2:-1:2] = curve.pro
    return float(_area_to_limit(fpr, pro, fpr_limit) / fpr_limit)


def _curve_aupro_anomalyclip(
    curve: _Curve,
    neg_sorted: np.ndarray,
    fpr_limit: float,
    image_negatives: list[np.ndarray] | None = None,
) -> float:
    """AnomalyCLIP / April-GAN `cal_pro_score` (AnomalyCLIP's `metrics.py`, April-GAN's
    `test.py`), its exceptions turned into NaN.

    200 thresholds `np.arange(min, max, (max - min) / 200)`, strict `A > t`, keep FPR < limit,
    min-max rescale of the kept FPRs, then sklearn's `auc` (trapezoid in threshold order).
    The FPR is pooled over the class's normal pixels; with `image_negatives` (each image's sorted
    normal-pixel scores) it is SOWA's mean over images of the per-image FPR (its
    `src/utils/metrics.py::cal_pro_score`).
    """
    low = min(neg_sorted[0], curve.scores[-1])  # numpy scalars: thresholds keep the maps' dtype
    high = max(neg_sorted[-1], curve.scores[0])
    step = (high - low) / _ANOMALYCLIP_STEPS
    if not step > 0:
        logger.warning("AUPRO (200-step) undefined: constant maps (step 0); returning NaN")
        return float("nan")
    thresholds = np.arange(low, high, step)
    if image_negatives is None:
        fpr = (
            curve.num_neg - np.searchsorted(neg_sorted, thresholds, side="right")
        ) / curve.num_neg
    else:
        if any(negatives.size == 0 for negatives in image_negatives):
            logger.warning("AUPRO (SOWA) undefined: an image has no normal pixel; returning NaN")
            return float("nan")
        fpr = np.mean(
            [
                (n.size - np.searchsorted(n, thresholds, side="right")) / n.size
                for n in image_negatives
            ],
            axis=0,
        )
    # PRO(A > t) = summed weight of the positives above t = weight at the smallest u_k > t.
    above = curve.scores.size - np.searchsorted(curve.scores[::-1], thresholds, side="right")
    pro = np.where(above > 0, curve.pro[np.maximum(above - 1, 0)], 0.0)
    keep = fpr < fpr_limit
    kept_fpr, kept_pro = fpr[keep], pro[keep]
    if kept_fpr.size < 2 or kept_fpr.max() == kept_fpr.min():
        logger.warning(
            "AUPRO (200-step) undefined: %d kept thresholds with distinct FPR; returning NaN",
            np.unique(kept_fpr).size,
        )
        return float("nan")
    x = (kept_fpr - kept_fpr.min()) / (kept_fpr.max() - kept_fpr.min())
    return float(-np.trapezoid(kept_pro, x))  # x non-increasing: sklearn's auc uses direction -1


class PixelAccumulator:
    """Streams one class's maps batch by batch; `compute()` gives the pooled pixel metrics.

    Memory: 4 B per negative pixel (float32 maps) plus ~8 B per positive pixel (score and
    region id). With `capacity` (the class's total pixel count) negatives go into one
    preallocated buffer instead of a list of chunks that is concatenated at the end.
    `pro_variant="sowa"` keeps a second, per-image sorted copy of the negatives.
    `extra_limits` (with `with_pro`): AUPRO at these limits too, as "aupro@<limit>" (MVTec AD 2's
    0.05), from the same curve.
    """

    def __init__(
        self,
        fpr_limit: float = 0.3,
        pro_variant: str = "exact",
        with_pro: bool = True,
        capacity: int | None = None,
        name: str = "pixel",
        extra_limits: tuple[float, ...] = (),
    ) -> None:
        _check_limit(fpr_limit)
        _check_variant(pro_variant)
        for limit in extra_limits:
            _check_limit(limit)
        self.fpr_limit = fpr_limit
        # result key -> FPR limit of each AUPRO computed
        self._aupro_limits = (
            {"aupro": fpr_limit, **{f"aupro@{limit:g}": limit for limit in extra_limits}}
            if with_pro
            else {}
        )
        self.pro_variant = pro_variant
        self.with_pro = with_pro
        self.capacity = capacity
        self.name = name
        self._buffer: np.ndarray | None = None
        self._filled = 0
        self._neg_chunks: list[np.ndarray] = []
        self._pos_chunks: list[np.ndarray] = []
        self._region_ids: list[np.ndarray] = []
        self._region_sizes: list[np.ndarray] = []
        self._num_regions = 0
        self._image_negatives: list[np.ndarray] = []  # pro_variant "sowa" only: per-image FPRs

    def update(self, maps: Any, masks: Any, valid: Any = None) -> None:
        """maps: [B, H, W] float32; masks: [B, H, W] bool; valid: [B, H, W] bool or None (all):
        pixels outside it (letterbox padding) are not scored, and no defect lies there."""
        maps, masks, valid = _pixel_batch(maps, masks, valid)
        negative = ~masks
        if valid is not None:
            negative &= valid
        self._append_negatives(maps[negative])
        if self.with_pro and self.pro_variant == "sowa":
            self._image_negatives.extend(np.sort(m[n]) for m, n in zip(maps, negative, strict=True))
        if not masks.any():
            return
        self._pos_chunks.append(maps[masks])
        if self.with_pro:
            for mask in masks:
                if not mask.any():
                    continue
                labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
                region_of_pixel = labels[mask]  # row-major, the order of maps[masks]
                self._region_ids.append(region_of_pixel - 1 + self._num_regions)
                self._region_sizes.append(np.bincount(region_of_pixel)[1:])
                self._num_regions += count

    def _append_negatives(self, negatives: np.ndarray) -> None:
        if self.capacity is None:
            self._neg_chunks.append(negatives)
            return
        if self._buffer is None:
            self._buffer = np.empty(self.capacity, dtype=negatives.dtype)
        end = self._filled + negatives.size
        if end > self.capacity:
            raise ValueError(f"PixelAccumulator capacity {self.capacity} exceeded ({end} pixels)")
        self._buffer[self._filled : end] = negatives
        self._filled = end

    def _negatives(self) -> np.ndarray:
        if self._buffer is not None:
            return self._buffer[: self._filled]
        if len(self._neg_chunks) == 1:
            return self._neg_chunks[0]
        return np.concatenate(self._neg_chunks) if self._neg_chunks else np.empty(0, np.float32)

    def compute(self) -> dict[str, float]:
        """-> {"auroc", "ap", "f1_max", "aupro"} ("aupro" only with with_pro) plus
        "aupro@<limit>" per extra limit; NaN if undefined."""
        keys = ["auroc", "ap", "f1_max", *self._aupro_limits]
        neg = self._negatives()
        neg.sort()  # in place: the accumulator owns this copy
        pos = np.concatenate(self._pos_chunks) if self._pos_chunks else np.empty(0, neg.dtype)
        if pos.size == 0 or neg.size == 0:
            _warn_undefined(self.name, pos.size, neg.size)
            return dict.fromkeys(keys, float("nan"))
        weights = None
        if self.with_pro:
            sizes = np.concatenate(self._region_sizes).astype(np.float64)
            weights = (1.0 / sizes)[np.concatenate(self._region_ids)] / sizes.size
        curve = _curve(neg, pos, weights)
        result = {
            "auroc": _curve_auroc(curve),
            "ap": _curve_ap(curve),
            "f1_max": _curve_f1_max(curve),
        }
        per_image = self._image_negatives if self.pro_variant == "sowa" else None
        for key, limit in self._aupro_limits.items():
            if self.pro_variant == "exact":
                result[key] = _curve_aupro(curve, limit)
            else:
                result[key] = _curve_aupro_anomalyclip(curve, neg, limit, per_image)
        return result


def pixel_metrics(
    maps: Any, masks: Any, fpr_limit: float = 0.3, pro_variant: str = "exact"
) -> dict[str, float]:
    """Pooled pixel AUROC, AP, F1-max and AUPRO of one class from one sort of its negatives.

    maps: [N, H, W] float32; masks: [N, H, W] bool. -> {"auroc", "ap", "f1_max", "aupro"}.
    """
    accumulator = PixelAccumulator(fpr_limit, pro_variant)
    accumulator.update(maps, masks)
    return accumulator.compute()


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3, variant: str = "exact") -> float:
    """AUPRO up to `fpr_limit`, normalised to [0, 1]. maps: [N, H, W]; masks: [N, H, W] bool.

    variant "exact": MVTec AD official definition (8-connected regions, global FPR over every
    normal pixel, all thresholds). "anomalyclip": the 200-step approximation (AnomalyCLIP's
    `cal_pro_score`). "sowa": the same with SOWA's mean over images of the per-image FPR (SOWA's
    `cal_pro_score`).
    """
    return pixel_metrics(maps, masks, fpr_limit, variant)["aupro"]


class ValidationThreshold:
    """SegF1's threshold of one class from its normal maps (validation/good), streamed batch by
    batch: the `percentile`-th percentile of their pixel scores, i.e. the smallest score t with at
    most (100 - percentile) % of the pixels above it (`map > t` is a defect; 100: the maximum).

    Memory: 4 B per pixel; with `capacity` (the pixel count to come) only the pixels that can
    still become the threshold are kept, (100 - percentile) % of them plus one.
    """

    def __init__(
        self, percentile: float = DEFAULT_SEG_PERCENTILE, capacity: int | None = None
    ) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"the SegF1 percentile must be in (0, 100], got {percentile}")
        # the decimal the user wrote (99.9 is 999/10, not the binary float just above it)
        self._share_above = (100 - Fraction(repr(float(percentile)))) / 100
        self.capacity = capacity
        self._keep = None if capacity is None else self._num_above(capacity) + 1
        self._count = 0
        self._chunks: list[np.ndarray] = []

    def _num_above(self, count: int) -> int:
        """How many of `count` pixels may score above the threshold (rounded down)."""
        return int(self._share_above * count)

    def update(self, maps: Any, valid: Any = None) -> None:
        """maps: [B, H, W] of normal images; valid: [B, H, W] bool, the pixels to use (None:
        all)."""
        maps = _as_scores(maps, "maps")
        if maps.ndim != 3:
            raise ValueError(f"maps {maps.shape} must be [B, H, W]")
        if valid is None:
            scores = maps.reshape(-1).copy()
        else:
            valid = _as_binary(valid, "valid")
            if valid.shape != maps.shape:
                raise ValueError(f"valid {valid.shape} must match maps {maps.shape}")
            scores = maps[valid]
        self._count += scores.size
        if self._keep is None:
            self._chunks.append(scores)
            return
        if self._count > self.capacity:
            raise ValueError(f"ValidationThreshold capacity {self.capacity} exceeded")
        kept = np.concatenate([*self._chunks, scores])
        if kept.size > self._keep:
            kept = np.partition(kept, kept.size - self._keep)[kept.size - self._keep :]
        self._chunks = [kept]

    def compute(self) -> float:
        """The threshold t (a score of one of the pixels)."""
        if self._count == 0:
            raise ValueError("no normal map was given; predict the class's validation/good images")
        scores = np.concatenate(self._chunks)
        index = scores.size - 1 - self._num_above(self._count)  # the (num_above + 1)-th largest
        return float(np.partition(scores, index)[index])


def seg_threshold(normal_maps: Any, percentile: float = DEFAULT_SEG_PERCENTILE) -> float:
    """SegF1's threshold from one class's normal maps held whole (`ValidationThreshold` in one
    update). normal_maps: [N, H, W]."""
    threshold = ValidationThreshold(percentile)
    threshold.update(normal_maps)
    return threshold.compute()


class SegF1Accumulator:
    """SegF1 of one class, streamed batch by batch: the pixel F1 2TP / (2TP + FP + FN) of the
    maps binarised as `map > threshold`, pooled over every test pixel of the class (normal
    images included); three counts, no map is held. NaN (and a warning) without defect pixels."""

    def __init__(self, threshold: float, name: str = "SegF1") -> None:
        if not np.isfinite(threshold):
            raise ConfigError(f"the SegF1 threshold must be a finite number, got {threshold}")
        self.threshold = threshold
        self.name = name
        self.true_positives = 0
        self.false_positives = 0
        self.false_negatives = 0

    def update(self, maps: Any, masks: Any, valid: Any = None) -> None:
        """maps: [B, H, W] float; masks: [B, H, W] bool; valid: [B, H, W] bool or None (all):
        pixels outside it are not scored."""
        maps, masks, valid = _pixel_batch(maps, masks, valid)
        predicted = maps > self.threshold
        if valid is not None:
            predicted &= valid
        self.true_positives += int(np.count_nonzero(predicted & masks))
        self.false_positives += int(np.count_nonzero(predicted & ~masks))
        self.false_negatives += int(np.count_nonzero(~predicted & masks))

    def compute(self) -> float:
        """SegF1 in [0, 1], NaN when the class has no defect pixel."""
        positives = self.true_positives + self.false_negatives
        if positives == 0:
            logger.warning("%s undefined (no defect pixel); returning NaN", self.name)
            return float("nan")
        true_positives = self.true_positives
        return 2 * true_positives / (true_positives + self.false_positives + positives)


def seg_f1(maps: Any, masks: Any, threshold: float) -> float:
    """SegF1 of one class held whole. maps: [N, H, W]; masks: [N, H, W] bool."""
    accumulator = SegF1Accumulator(threshold)
    accumulator.update(maps, masks)
    return accumulator.compute()


def _binary_curve(scores: Any, labels: Any, what: str) -> _Curve | None:
    """Curve of scores [N] against labels [N]; None (and one warning) if one label only."""
    scores = _as_scores(scores, "scores").reshape(-1)
    labels = _as_binary(labels, "labels").reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in size")
    neg = np.sort(scores[~labels])
    pos = scores[labels]
    if pos.size == 0 or neg.size == 0:
        _warn_undefined(what, pos.size, neg.size)
        return None
    return _curve(neg, pos)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (ties count 1/2). scores: [N]; labels: [N] bool."""
    curve = _binary_curve(scores, labels, "AUROC")
    return float("nan") if curve is None else _curve_auroc(curve)


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, sklearn's step sum. scores: [N]; labels: [N] bool."""
    curve = _binary_curve(scores, labels, "AP")
    return float("nan") if curve is None else _curve_ap(curve)


def f1_max(scores: Any, labels: Any) -> float:
    """Maximum F1 over the precision-recall curve. scores: [N]; labels: [N] bool."""
    curve = _binary_curve(scores, labels, "F1-max")
    return float("nan") if curve is None else _curve_f1_max(curve)


def image_metrics(scores: Any, labels: Any, name: str = "image") -> dict[str, float]:
    """scores: [N]; labels: [N] bool -> {"auroc", "ap", "f1_max"}; NaN when one label only."""
    curve = _binary_curve(scores, labels, name)
    if curve is None:
        return dict.fromkeys(("auroc", "ap", "f1_max"), float("nan"))
    return {"auroc": _curve_auroc(curve), "ap": _curve_ap(curve), "f1_max": _curve_f1_max(curve)}


class ClassEvaluator:
    """Streams one class's maps and masks batch by batch into its pixel metrics, so that no
    full-size map is held (the evaluation loop).

    `capacity` (the class's pixel count) preallocates the accumulator's buffer; `compute`
    takes the image scores and labels at the end. Columns are names from COLUMNS_FULL or
    COLUMNS_MVTEC_AD2; "SegF1" needs `seg_threshold` (`ValidationThreshold` on the class's
    validation/good maps, never the test maps).
    """

    def __init__(
        self,
        columns: list[str],
        fpr_limit: float = 0.3,
        pro_variant: str = "exact",
        capacity: int | None = None,
        class_name: str = "",
        seg_threshold: float | None = None,
    ) -> None:
        unknown = [column for column in columns if column not in _VALID_COLUMNS]
        if unknown:
            msg = f"unknown metric columns {unknown}; valid: {', '.join(_VALID_COLUMNS)}"
            raise ConfigError(msg)
        self.columns = columns
        self.prefix = f"{class_name} " if class_name else ""
        self.pixel: PixelAccumulator | None = None
        if any(column in _PIXEL_KEYS for column in columns):
            mvtec_ad2_aupro = f"AUPRO@{MVTEC_AD2_FPR_LIMIT:g}" in columns
            self.pixel = PixelAccumulator(
                fpr_limit,
                pro_variant,
                with_pro="AUPRO" in columns or mvtec_ad2_aupro,
                capacity=capacity,
                name=f"{self.prefix}pixel",
                extra_limits=(MVTEC_AD2_FPR_LIMIT,) if mvtec_ad2_aupro else (),
            )
        self.seg: SegF1Accumulator | None = None
        if "SegF1" in columns:
            if seg_threshold is None:
                raise ConfigError(
                    "the SegF1 column needs a threshold: ValidationThreshold on the class's "
                    "validation/good maps"
                )
            self.seg = SegF1Accumulator(seg_threshold, name=f"{self.prefix}SegF1")

    def update(self, maps: Any, masks: Any, valid: Any = None) -> None:
        """maps: [B, H, W] float; masks: [B, H, W] bool (may be None without pixel columns);
        valid: [B, H, W] bool, the pixels to score (None: all)."""
        if self.pixel is None and self.seg is None:
            return
        if masks is None:
            raise ValueError("pixel columns need maps and masks")
        maps = _to_numpy(maps)
        if self.pixel is not None:
            self.pixel.update(maps, masks, valid)
        if self.seg is not None:
            self.seg.update(maps, masks, valid)

    def compute(self, image_scores: Any, labels: Any) -> dict[str, float]:
        """The requested columns, values in [0, 1] or NaN; image_scores/labels: [N] (may be
        None when no image column is asked)."""
        values: dict[str, float] = {}
        if self.pixel is not None:
            pixel = self.pixel.compute()
            values.update({col: pixel[key] for col, key in _PIXEL_KEYS.items() if key in pixel})
        if self.seg is not None:
            values["SegF1"] = self.seg.compute()
        if any(column in _IMAGE_KEYS for column in self.columns):
            if image_scores is None or labels is None:
                raise ValueError("image columns need image scores and labels")
            image = image_metrics(image_scores, labels, name=f"{self.prefix}image")
            values.update({col: image[key] for col, key in _IMAGE_KEYS.items()})
        return {column: values[column] for column in self.columns}


def evaluate_class(
    maps: Any,
    masks: Any,
    image_scores: Any,
    labels: Any,
    columns: list[str],
    fpr_limit: float = 0.3,
    pro_variant: str = "exact",
    class_name: str = "",
    seg_threshold: float | None = None,
) -> dict[str, float]:
    """Requested `columns` (names from COLUMNS_FULL or COLUMNS_MVTEC_AD2) of one class held
    whole, values in [0, 1] or NaN (`ClassEvaluator` in one update).

    maps/masks: [N, H, W] (may be None when no pixel column is asked);
    image_scores/labels: [N] (may be None when no image column is asked).
    """
    evaluator = ClassEvaluator(
        columns, fpr_limit, pro_variant, class_name=class_name, seg_threshold=seg_threshold
    )
    if evaluator.pixel is not None or evaluator.seg is not None:
        if maps is None or masks is None:
            raise ValueError("pixel columns need maps and masks")
        evaluator.update(maps, masks)
    return evaluator.compute(image_scores, labels)
