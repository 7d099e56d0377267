"""MVTec AD 2's metrics against values worked out by hand on tiny arrays: AUPRO integrated to
FPR 0.05 beside 0.3, SegF1 at a threshold from normal maps, its oracle bound, and the streamed
evaluator equal to the class held whole (the existing columns unchanged bit for bit)."""

import logging

import numpy as np
import pytest

from utils.core.errors import ConfigError
from utils.evaluation.metrics import (
    COLUMNS_FULL,
    COLUMNS_MVTEC_AD2,
    DEFAULT_SEG_PERCENTILE,
    ClassEvaluator,
    PixelAccumulator,
    SegF1Accumulator,
    ValidationThreshold,
    aupro,
    evaluate_class,
    seg_f1,
    seg_threshold,
)


# ----------------------------------------------------------------------------------------------
# AUPRO at MVTec AD 2's limit 0.05.
def two_regions_at_two_fprs() -> tuple[np.ndarray, np.ndarray]:
    """1 image 1 x 42: region A (pixel 0) scores above every normal pixel, region B (pixel 2)
    below exactly one of the 40 normal pixels (FPR step 1/40 = 0.025).
    Curve (0,0) -> (0,1/2) -> (0.025,1/2) -> (0.025,1) -> (1,1)."""
    maps = np.empty((1, 1, 42), dtype=np.float32)
    maps[0, 0, 0] = 0.99  # region A
    maps[0, 0, 1] = 0.9  # the one normal pixel above region B
    maps[0, 0, 2] = 0.85  # region B
    maps[0, 0, 3:] = 0.8 - 0.01 * np.arange(39)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, [0, 2]] = True  # not 8-adjacent: two regions of one pixel
    return maps, masks


def test_aupro_at_005_two_regions():
    maps, masks = two_regions_at_two_fprs()
    # 0.05: (0.025 * 1/2 + 0.025 * 1) / 0.05; 0.3: (0.0125 + 0.275) / 0.3
    assert aupro(maps, masks, fpr_limit=0.05) == pytest.approx(0.75, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(23 / 24, abs=1e-12)
    accumulator = PixelAccumulator(extra_limits=(0.05,))
    accumulator.update(maps, masks)
    result = accumulator.compute()
    assert result["aupro@0.05"] == pytest.approx(0.75, abs=1e-12)
    assert result["aupro"] == pytest.approx(23 / 24, abs=1e-12)


def test_aupro_at_005_interpolates_inside_a_tie():
    # A defect pixel tied with one of 10 normal pixels: the curve is the diagonal (0,0)-(0.1,1),
    # so PRO(0.05) = 1/2: 0.05 gives (1/2 * 0.05 * 1/2) / 0.05 = 1/4, 0.3 gives (0.05 + 0.2) / 0.3.
    maps = np.array([[[0.5, 0.5, *[0.1] * 9]]], dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, 0] = True
    assert aupro(maps, masks, fpr_limit=0.05) == pytest.approx(0.25, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(5 / 6, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# SegF1 and its threshold.
def seg_class() -> tuple[np.ndarray, np.ndarray]:
    """2 images 2 x 3; image 0 has 3 defect pixels scored 0.9, 0.7, 0.3, image 1 is normal."""
    maps = np.array(
        [[[0.9, 0.2, 0.6], [0.1, 0.7, 0.3]], [[0.8, 0.1, 0.1], [0.1, 0.1, 0.1]]], dtype=np.float32
    )
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    return maps, masks


def test_seg_f1_hand_values():
    maps, masks = seg_class()
    # > 0.5: TP 0.9, 0.7; FP 0.6, 0.8; FN 0.3 -> 2*2 / (2*2 + 2 + 1)
    assert seg_f1(maps, masks, 0.5) == pytest.approx(4 / 7, abs=1e-12)
    # strictly above: at 0.6 the 0.6 pixel is not a defect -> TP 2, FP 1, FN 1
    assert seg_f1(maps, masks, 0.6) == pytest.approx(2 / 3, abs=1e-12)
    assert seg_f1(maps, masks, 0.95) == 0.0  # nothing predicted, 3 defect pixels missed


def test_seg_f1_streamed_and_valid_pixels():
    maps, masks = seg_class()
    streamed = SegF1Accumulator(0.5)
    streamed.update(maps[:1], masks[:1])
    streamed.update(maps[1:], masks[1:])
    assert streamed.compute() == seg_f1(maps, masks, 0.5)
    valid = np.ones(maps.shape, dtype=bool)
    valid[1, 0, 0] = False  # the 0.8 false positive is padding: not scored
    padded = SegF1Accumulator(0.5)
    padded.update(maps, masks, valid)
    assert (padded.true_positives, padded.false_positives, padded.false_negatives) == (2, 1, 1)
    assert padded.compute() == pytest.approx(4 / 6, abs=1e-12)


def test_seg_f1_undefined_without_defect_pixels(caplog):
    maps, _ = seg_class()
    with caplog.at_level(logging.WARNING, logger="utils.evaluation.metrics"):
        assert np.isnan(seg_f1(maps, np.zeros(maps.shape, dtype=bool), 0.5))
    assert "no defect pixel" in caplog.text
    with pytest.raises(ConfigError, match="finite"):
        SegF1Accumulator(float("nan"))


def test_threshold_hand_values():
    values = (np.arange(1, 11, dtype=np.float32) / 10).reshape(1, 2, 5)  # 0.1 ... 1.0
    # at most 10 % of the 10 pixels above t: t = 0.9 (one pixel, 1.0, is above)
    assert seg_threshold(values, 90) == pytest.approx(0.9)
    assert seg_threshold(values, 100) == pytest.approx(1.0)  # the maximum
    assert seg_threshold(values, 99.9) == pytest.approx(1.0)  # 0.1 % of 10 pixels: none above
    assert seg_threshold(values, 50) == pytest.approx(0.5)
    # 1000 pixels 0.001 ... 1.000: 0.1 % is exactly one pixel above, whatever 100 - 99.9 is in
    # binary floating point (0.0999999...: rounded down it would allow none and give the max)
    thousand = (np.arange(1, 1001) / 1000).reshape(1, 10, 100)
    assert seg_threshold(thousand, 99.9) == pytest.approx(0.999, abs=1e-12)
    assert DEFAULT_SEG_PERCENTILE == 99.9


@pytest.mark.parametrize("percentile", [50, 75, 99.5, 100])
def test_threshold_streamed_equals_numpy_inverted_cdf(percentile):
    rng = np.random.default_rng(int(percentile))
    maps = np.round(rng.random((7, 13, 11)), 2).astype(np.float32)  # heavy ties
    expected = np.percentile(maps, percentile, method="inverted_cdf")
    assert seg_threshold(maps, percentile) == expected
    for capacity in (None, maps.size):
        threshold = ValidationThreshold(percentile, capacity=capacity)
        for start in range(0, 7, 3):
            threshold.update(maps[start : start + 3])
        assert threshold.compute() == expected


def test_threshold_keeps_only_its_tail_with_a_capacity():
    rng = np.random.default_rng(0)
    maps = rng.random((10, 20, 50), dtype=np.float32)  # 10,000 pixels
    threshold = ValidationThreshold(99, capacity=maps.size)
    for image in maps:
        threshold.update(image[None])
        assert sum(chunk.size for chunk in threshold._chunks) <= 101  # 1 % of 10,000, plus one
    assert threshold.compute() == seg_threshold(maps, 99)
    with pytest.raises(ValueError, match="capacity"):
        threshold.update(maps[:1])


def test_threshold_valid_pixels_and_bad_input():
    maps = np.array([[[0.1, 0.2, 0.9]]], dtype=np.float32)
    threshold = ValidationThreshold(100)
    threshold.update(maps, valid=np.array([[[True, True, False]]]))  # 0.9 is padding
    assert threshold.compute() == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"\(0, 100\]"):
        ValidationThreshold(0)
    with pytest.raises(ValueError, match="validation/good"):
        ValidationThreshold().compute()


# ----------------------------------------------------------------------------------------------
# The evaluator's MVTec AD 2 columns.
def test_mvtec_ad2_columns_by_hand():
    maps, masks = seg_class()
    labels = masks.reshape(2, -1).any(axis=1)
    image_scores = maps.reshape(2, -1).max(axis=1)
    result = evaluate_class(maps, masks, image_scores, labels, COLUMNS_MVTEC_AD2, seg_threshold=0.5)
    assert list(result) == COLUMNS_MVTEC_AD2
    assert result["SegF1"] == pytest.approx(4 / 7, abs=1e-12)
    # best binarisation on the test maps: > 0.25 gives TP 3, FP 2 (0.8, 0.6) -> 6 / 8
    assert result["SegF1-oracle"] == pytest.approx(0.75, abs=1e-12)
    assert result["I-AUROC"] == 1.0
    full = evaluate_class(maps, masks, image_scores, labels, COLUMNS_FULL)
    assert result["SegF1-oracle"] == full["P-F1max"]
    assert result["AUPRO@0.05"] == aupro(maps, masks, fpr_limit=0.05)


def test_streamed_evaluator_equals_the_class_held_whole():
    rng = np.random.default_rng(5)
    maps = np.round(rng.random((6, 12, 12)), 1).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[1:4, 3:6, 2:5] = True
    masks[4, 0, 0] = True
    image_scores = maps.reshape(6, -1).max(axis=1)
    labels = masks.reshape(6, -1).any(axis=1)
    columns = COLUMNS_FULL + ["AUPRO@0.05", "SegF1", "SegF1-oracle"]
    whole = evaluate_class(maps, masks, image_scores, labels, columns, seg_threshold=0.6)
    evaluator = ClassEvaluator(columns, capacity=maps.size, class_name="can", seg_threshold=0.6)
    for batch in (slice(0, 4), slice(4, 6)):
        evaluator.update(maps[batch], masks[batch])
    assert evaluator.compute(image_scores, labels) == whole
    # the new columns leave the existing ones exactly as they were
    alone = evaluate_class(maps, masks, image_scores, labels, COLUMNS_FULL)
    assert {column: whole[column] for column in COLUMNS_FULL} == alone


def test_segf1_column_needs_a_validation_threshold():
    with pytest.raises(ConfigError, match="validation/good"):
        ClassEvaluator(["SegF1"])
    with pytest.raises(ConfigError, match="SegF1-oracle"):
        ClassEvaluator(["AUPRO@0.3"])  # only MVTec AD 2's 0.05 is a column of its own
