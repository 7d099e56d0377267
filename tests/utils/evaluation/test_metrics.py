"""utils/evaluation/metrics.py against hand-checked vectors, sklearn, a full-sort MVTec AUPRO
oracle (the MVTec AD evaluation scripts' recipe) and a brute-force every-threshold AUPRO."""

import bisect
import logging

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from utils.core.errors import ConfigError
from utils.evaluation.metrics import (
    COLUMNS_FULL,
    COLUMNS_OFFICIAL,
    ClassEvaluator,
    PixelAccumulator,
    aupro,
    auroc,
    average_precision,
    evaluate_class,
    f1_max,
    image_metrics,
    pixel_metrics,
)


# ----------------------------------------------------------------------------------------------
# Oracle: the MVTec AD official recipe (`pro_curve_util.compute_pro`), full argsort of every pixel.
def full_sort_pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """maps, masks: [N, H, W] -> (fpr, pro) with (0,0) prepended, (1,1) appended, ties merged."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        image_labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        labels[i] = np.where(image_labels > 0, image_labels + offset, 0)
        offset += count
    sizes = np.bincount(labels.ravel())
    order = np.argsort(-maps.ravel(), kind="stable")
    sorted_scores = maps.ravel()[order]
    sorted_labels = labels.ravel()[order]
    ok = sorted_labels == 0
    fpr = np.cumsum(ok) / ok.sum()
    pro_increment = np.where(ok, 0.0, 1.0 / (offset * sizes[sorted_labels]))
    pro = np.cumsum(pro_increment)
    run_ends = np.append(np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.size - 1)
    fpr = np.concatenate(([0.0], np.minimum(fpr[run_ends], 1.0), [1.0]))
    pro = np.concatenate(([0.0], np.minimum(pro[run_ends], 1.0), [1.0]))
    return fpr, pro


def mvtec_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """MVTec `generic_util.trapezoid`: area under y(x) up to x_max, interpolated there."""
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(list(x), x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def oracle_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    fpr, pro = full_sort_pro_curve(maps, masks)
    return mvtec_trapezoid(fpr, pro, limit) / limit


def literal_cal_pro_score(
    masks: np.ndarray, amaps: np.ndarray, expect_fpr: float = 0.3, per_image_fpr: bool = False
) -> float:
    """AnomalyCLIP's `cal_pro_score` (its `metrics.py`) re-stated loop for loop, scipy for
    skimage.

    per_image_fpr: SOWA's version, the FPR is the mean over images of each image's FPR.
    """
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / 200
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary = amaps > th
        pro = []
        for binary_amap, mask in zip(binary, masks, strict=True):
            labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
            for region in range(1, count + 1):
                coords = labels == region
                pro.append(binary_amap[coords].sum() / coords.sum())
        inverse_masks = 1 - masks
        if per_image_fpr:
            fprs.append(
                np.mean(
                    [
                        np.logical_and(inverse, image).sum() / inverse.sum()
                        for inverse, image in zip(inverse_masks, binary, strict=True)
                    ]
                )
            )
        else:
            fprs.append(np.logical_and(inverse_masks, binary).sum() / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    fprs = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    return float(auc(fprs, pros[keep]))


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """AUPRO by definition (MVTec AD's), independent of both sort-based algorithms.

    Every distinct score t is a threshold (positive: A >= t). At each one: the overlap of every
    8-connected region of every mask, averaged over regions, and the FPR over all normal pixels
    (normal images included). Curve (0,0), the points by decreasing t, (1,1); trapezoids up to
    `limit`, the segment that crosses it cut at `limit` by linear interpolation; / limit.
    """
    regions = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == region) for region in range(1, count + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        positive = maps >= threshold
        fpr = (positive & normal).sum() / normal.sum()
        pro = np.mean([positive[i][region].sum() / region.sum() for i, region in regions])
        points.append((float(fpr), float(pro)))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_mask_class(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 maps of 8x8 rounded to 0.1 (ties); scattered random masks (many 8-connected regions,
    some only diagonally connected); image 0 normal; defects score higher on average."""
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 8, 8)) < 0.25
    masks[0] = False
    maps = np.round(np.clip(rng.random(masks.shape) + 0.3 * masks, 0, 1), 1).astype(np.float32)
    return maps, masks


def random_class(seed: int, num_images: int = 6, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Maps with heavy ties (rounded to 0.1), rectangle defects, a normal-only image (img 0)."""
    rng = np.random.default_rng(seed)
    maps = np.round(rng.random((num_images, size, size)), 1).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    for i in range(1, num_images):
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, size - 3, 2)
            height, width = rng.integers(1, 5, 2)
            masks[i, top : top + height, left : left + width] = True
    maps[masks] = np.round(np.minimum(maps[masks] + 0.3, 1.0), 1)
    return maps, masks


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


# ----------------------------------------------------------------------------------------------
# Test vectors worked out by hand.
def tv_d() -> tuple[np.ndarray, np.ndarray]:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 2:4, 2:4] = True
    maps = np.full((2, 4, 4), 0.1, dtype=np.float32)
    maps[0, 0, 0] = 0.9
    maps[0, 2:4, 2:4] = 0.2
    maps[1, 0, :3] = 0.8
    return maps, masks


def assert_pixel(result: dict, auroc_: float, ap: float, f1: float, pro: float) -> None:
    assert result["auroc"] == pytest.approx(auroc_, abs=1e-12)
    assert result["ap"] == pytest.approx(ap, abs=1e-12)
    assert result["f1_max"] == pytest.approx(f1, abs=1e-12)
    assert result["aupro"] == pytest.approx(pro, abs=1e-12)


def test_tv_a_perfect():
    _, masks = tv_d()
    assert_pixel(pixel_metrics(masks.astype(np.float32), masks), 1, 1, 1, 1)


def test_tv_b_inverted():
    _, masks = tv_d()
    assert_pixel(pixel_metrics(1 - masks.astype(np.float32), masks), 0, 5 / 32, 10 / 37, 0)


def test_tv_c_constant_map(caplog):
    _, masks = tv_d()
    maps = np.full(masks.shape, 0.5, dtype=np.float32)
    assert_pixel(pixel_metrics(maps, masks), 0.5, 5 / 32, 10 / 37, 0.15)
    with caplog.at_level(logging.WARNING, logger="utils.evaluation.metrics"):
        assert np.isnan(aupro(maps, masks, variant="anomalyclip"))
    assert "200-step" in caplog.text


def test_tv_d_two_regions_and_a_normal_image():
    maps, masks = tv_d()
    assert_pixel(pixel_metrics(maps, masks), 123 / 135, 0.7, 10 / 13, 22 / 27)
    assert aupro(maps, masks, variant="anomalyclip") == pytest.approx(0.5, abs=1e-12)
    image_scores = maps.reshape(2, -1).max(axis=1)
    assert auroc(image_scores, [1, 0]) == 1.0


def test_tv_e_eight_connectivity():
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 3, 3), 0.5, dtype=np.float32)
    maps[0, 0, 0] = 0.9
    maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    assert aupro(maps, masks) == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize(
    ("columns", "pro_third", "pro_default"),
    [([3], 0.1666656, 0.15), ([1, 3, 5], 0.1666661, 0.15)],
)
def test_tv_f_anomalib_vectors(columns, pro_third, pro_default):
    maps = (np.arange(2800) / 2800).reshape(1, 400, 7).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[..., columns] = True
    assert aupro(maps, masks, fpr_limit=1 / 3) == pytest.approx(pro_third, abs=1e-7)
    assert aupro(maps, masks) == pytest.approx(pro_default, abs=1e-9)


def test_tv_g_ties_between_normal_and_defect():
    maps = np.array([[[0.5, 0.5, 0.2, 0.2]]], dtype=np.float32)
    masks = np.array([[[1, 0, 0, 0]]])
    assert_pixel(pixel_metrics(maps, masks), 5 / 6, 0.5, 2 / 3, 0.45)


@pytest.mark.parametrize(
    ("defect", "expected"), [(0.85, (0.8, 1 / 3, 0.5, 1 / 3)), (0.75, (0.7, 0.25, 0.4, 0.0))]
)
def test_tv_h_limit_hit_exactly(defect, expected):
    maps = np.array([[[defect, *np.round(np.arange(1.0, 0.05, -0.1), 1)]]], dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, 0] = True
    assert_pixel(pixel_metrics(maps, masks), *expected)


@pytest.mark.parametrize("seed", range(5))
def test_tv_i_random_maps(seed):
    # The MVTec toy recipe at full size (~0.3 s each); these seeds gave 0.1499-0.1523.
    rng = np.random.default_rng(seed)
    maps = rng.random((200, 300, 500), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[:, :10, :10] = True
    result = pixel_metrics(maps, masks)
    assert abs(result["aupro"] - 0.15) < 0.005
    assert abs(result["auroc"] - 0.5) < 0.005


def test_tv_j_image_metrics_with_ties():
    scores, labels = [0.5, 0.5, 0.2, 0.9], [0, 1, 0, 1]
    result = image_metrics(scores, labels)
    assert result["auroc"] == pytest.approx(0.875, abs=1e-12)
    assert result["ap"] == pytest.approx(5 / 6, abs=1e-12)
    assert result["f1_max"] == pytest.approx(0.8, abs=1e-12)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Properties: equal to sklearn and the oracles, invariant to monotone maps and image order.
@pytest.mark.parametrize("seed", range(6))
def test_equals_sklearn_and_full_sort_oracle(seed):
    maps, masks = random_class(seed)
    scores, labels = maps.ravel(), masks.ravel()
    result = pixel_metrics(maps, masks)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["f1_max"] == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)
    assert result["aupro"] == pytest.approx(oracle_aupro(maps, masks), abs=1e-12)
    assert auroc(scores, labels) == result["auroc"]
    assert average_precision(scores, labels) == result["ap"]
    assert f1_max(scores, labels) == result["f1_max"]


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", range(5))
def test_exact_aupro_equals_brute_force(seed, limit):
    maps, masks = random_mask_class(seed)
    expected = brute_force_aupro(maps, masks, limit)
    assert aupro(maps, masks, fpr_limit=limit, variant="exact") == pytest.approx(expected, abs=1e-9)
    maps, masks = random_class(seed)  # rectangles, 6 images of 16x16
    expected = brute_force_aupro(maps, masks, limit)
    assert aupro(maps, masks, fpr_limit=limit, variant="exact") == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_image_level_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(40), 1)
    labels = rng.random(40) < 0.4
    result = image_metrics(scores, labels)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["f1_max"] == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_invariant_to_monotone_transform_and_image_order(seed):
    maps, masks = random_class(seed)
    reference = pixel_metrics(maps, masks)
    permutation = np.random.default_rng(seed).permutation(maps.shape[0])
    for transformed, transformed_masks in (
        (maps**3, masks),
        (maps[permutation], masks[permutation]),
    ):
        result = pixel_metrics(transformed, transformed_masks)
        for key, value in reference.items():
            assert result[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", range(3))
def test_limit_one_is_the_full_area(seed):
    maps, masks = random_class(seed)
    fpr, pro = full_sort_pro_curve(maps, masks)
    full_area = float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1])) / 2)
    value = aupro(maps, masks, fpr_limit=1.0)
    assert value == pytest.approx(full_area, abs=1e-12)
    assert 0.0 <= aupro(maps, masks) <= 1.0


def test_accumulator_streaming_equals_one_shot():
    maps, masks = random_class(7, num_images=8)
    reference = pixel_metrics(maps, masks)
    for capacity in (None, maps.size):
        accumulator = PixelAccumulator(capacity=capacity)
        for start in range(0, 8, 3):
            accumulator.update(maps[start : start + 3], masks[start : start + 3])
        result = accumulator.compute()
        for key, value in reference.items():
            assert result[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("pro_variant", ["exact", "anomalyclip", "sowa"])
def test_class_evaluator_streamed_in_batches_equals_the_class_held_whole(pro_variant):
    maps, masks = random_class(3, num_images=7)
    image_scores = maps.reshape(7, -1).max(axis=1)
    labels = masks.reshape(7, -1).any(axis=1)
    whole = evaluate_class(maps, masks, image_scores, labels, COLUMNS_FULL, 0.3, pro_variant)
    evaluator = ClassEvaluator(COLUMNS_FULL, 0.3, pro_variant, capacity=maps.size)
    for batch in (slice(0, 3), slice(3, 4), slice(4, 7)):  # uneven, as a last batch is
        evaluator.update(maps[batch], masks[batch])
    assert evaluator.compute(image_scores, labels) == whole
    image_only = ClassEvaluator(["I-AUROC"])
    image_only.update(maps, None)  # no pixel column: the masks are not needed
    assert image_only.pixel is None
    assert image_only.compute(image_scores, labels) == {"I-AUROC": whole["I-AUROC"]}


@pytest.mark.parametrize("seed", range(3))
def test_anomalyclip_variant_equals_its_literal_restatement(seed):
    maps, masks = random_class(seed)
    maps = maps + np.float32(0.05) * np.random.default_rng(seed).random(maps.shape, np.float32)
    expected = literal_cal_pro_score(masks.astype(np.uint8), maps)
    assert aupro(maps, masks, variant="anomalyclip") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_sowa_variant_equals_its_literal_restatement(seed):
    maps, masks = random_class(seed)
    maps = maps + np.float32(0.05) * np.random.default_rng(seed).random(maps.shape, np.float32)
    expected = literal_cal_pro_score(masks.astype(np.uint8), maps, per_image_fpr=True)
    value = aupro(maps, masks, variant="sowa")
    assert value == pytest.approx(expected, abs=1e-12)
    # Images of different defect sizes weigh their FPRs differently than pooling does.
    assert value != pytest.approx(aupro(maps, masks, variant="anomalyclip"), abs=1e-9)
    streamed = PixelAccumulator(pro_variant="sowa")
    for start in range(0, maps.shape[0], 3):
        streamed.update(maps[start : start + 3], masks[start : start + 3])
    assert streamed.compute()["aupro"] == pytest.approx(expected, abs=1e-12)


def test_sowa_variant_is_nan_when_an_image_has_no_normal_pixel(caplog):
    maps, masks = random_class(0)
    masks[0] = True
    assert np.isnan(aupro(maps, masks, variant="sowa"))
    assert "no normal pixel" in caplog.text


def test_anomalyclip_variant_is_not_rank_invariant():
    maps, masks = random_class(1)
    maps = maps + np.float32(0.05) * np.random.default_rng(1).random(maps.shape, np.float32)
    exact = aupro(maps, masks)
    assert aupro(maps**3, masks) == pytest.approx(exact, abs=1e-12)
    approx = aupro(maps, masks, variant="anomalyclip")
    assert 0.0 <= approx <= 1.0
    assert aupro(maps**4, masks, variant="anomalyclip") != approx


def test_accepts_torch_tensors_and_01_masks():
    maps, masks = random_class(2)
    reference = pixel_metrics(maps, masks)
    result = pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.uint8)))
    assert result == reference


# ----------------------------------------------------------------------------------------------
# Undefined cases and bad input.
@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_single_class_labels_are_nan_with_a_warning(caplog, labels):
    for metric in (auroc, average_precision, f1_max):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="utils.evaluation.metrics"):
            assert np.isnan(metric([0.1, 0.5, 0.9], labels))
        assert len(caplog.records) == 1
    assert all(np.isnan(v) for v in image_metrics([0.1, 0.5, 0.9], labels).values())


@pytest.mark.parametrize("fill", [False, True])
def test_pixel_metrics_undefined(caplog, fill):
    maps = np.random.default_rng(0).random((2, 4, 4), dtype=np.float32)
    masks = np.full(maps.shape, fill)
    with caplog.at_level(logging.WARNING, logger="utils.evaluation.metrics"):
        result = pixel_metrics(maps, masks)
    assert set(result) == {"auroc", "ap", "f1_max", "aupro"}
    assert all(np.isnan(value) for value in result.values())
    assert len(caplog.records) == 1


def test_bad_input_is_refused():
    maps, masks = tv_d()
    with pytest.raises(ConfigError, match="exact, anomalyclip, sowa"):
        aupro(maps, masks, variant="mvtec")
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="bool or 0/1"):
        pixel_metrics(maps, masks * 0.5)
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(np.full(masks.shape, np.nan, dtype=np.float32), masks)


# ----------------------------------------------------------------------------------------------
# evaluate_class.
def test_evaluate_class_columns(caplog):
    maps, masks = tv_d()
    image_scores = maps.reshape(2, -1).max(axis=1)
    full = evaluate_class(maps, masks, image_scores, [1, 0], COLUMNS_FULL)
    assert list(full) == COLUMNS_FULL
    assert full["AUPRO"] == pytest.approx(22 / 27)
    assert full["I-AUROC"] == 1.0
    official = evaluate_class(maps, masks, image_scores, [1, 0], COLUMNS_OFFICIAL)
    assert official == {column: full[column] for column in COLUMNS_OFFICIAL}
    image_only = evaluate_class(None, None, image_scores, [1, 0], ["I-AUROC"])
    assert image_only == {"I-AUROC": 1.0}
    with caplog.at_level(logging.WARNING, logger="utils.evaluation.metrics"):
        colon = evaluate_class(maps, masks, image_scores, [1, 1], ["I-AUROC"], class_name="Kvasir")
    assert np.isnan(colon["I-AUROC"])
    assert "Kvasir image" in caplog.text
    with pytest.raises(ConfigError, match="P-AUROC"):
        evaluate_class(maps, masks, image_scores, [1, 0], ["AUPRO@0.3"])
