"""Percentile thresholds, reductions over valid pixels, decisions and the image-label report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from datasets.preprocessing import Preprocessing
from utils.core.errors import CheckpointError, ConfigError
from utils.deploy import calibration as calib
from utils.evaluation.metrics import auroc, average_precision


def _reductions(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {name: rng.normal(size=count) for name in ("max", "topk_mean", "mean")}


@pytest.mark.parametrize("percentile", [99.5, 99.9, 90.0, 37.3, 100.0])
def test_thresholds_equal_numpy_percentiles(percentile):
    rng = np.random.default_rng(1)
    scores = rng.gamma(2.0, size=57)
    reductions = _reductions(rng, 57)
    result = calib.calibrate(scores, reductions, percentile, "topk_mean", 0.02, "either")
    assert result["thresholds"]["image"] == np.percentile(scores, percentile)
    for name in calib.REDUCTIONS:
        assert result["thresholds"][name] == np.percentile(reductions[name], percentile)
    stats = result["stats"]["image"]
    assert stats["mean"] == pytest.approx(scores.mean())
    assert stats["std"] == pytest.approx(scores.std())
    assert stats["percentiles"][f"{percentile:g}"] == np.percentile(scores, percentile)
    assert (result["rule"], result["reduction"], result["top_fraction"]) == (
        "either",
        "topk_mean",
        0.02,
    )


def test_bad_settings_are_config_errors():
    scores, reductions = np.ones(3), _reductions(np.random.default_rng(0), 3)
    with pytest.raises(ConfigError, match="--percentile"):
        calib.calibrate(scores, reductions, percentile=100.5)
    with pytest.raises(ConfigError, match="--reduction"):
        calib.calibrate(scores, reductions, reduction="p99")
    with pytest.raises(ConfigError, match="--top_fraction"):
        calib.reduce_maps(torch.zeros(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), 0.0)


def test_reductions_use_valid_pixels_only():
    torch.manual_seed(0)
    maps = torch.rand(3, 10, 10)
    valid = torch.zeros(3, 10, 10, dtype=torch.bool)
    valid[:, 2:8, 1:9] = True  # 48 valid pixels
    valid[2] = True
    clean = calib.reduce_maps(maps, valid, top_fraction=0.05)
    flooded = calib.reduce_maps(torch.where(valid, maps, torch.tensor(1e6)), valid, 0.05)
    for name in ("max", "topk_mean", "mean"):
        np.testing.assert_array_equal(clean[name], flooded[name])
    for index in range(3):
        pixels = np.sort(maps[index][valid[index]].double().numpy())[::-1]
        top = math.ceil(0.05 * pixels.size)  # 3 of 48, 5 of 100
        assert clean["max"][index] == pytest.approx(pixels[0])
        assert clean["topk_mean"][index] == pytest.approx(pixels[:top].mean())
        assert clean["mean"][index] == pytest.approx(pixels.mean())


def _calibration(percentile: float = 99.5, rule: str = "image") -> dict:
    rng = np.random.default_rng(3)
    return calib.calibrate(rng.normal(size=200), _reductions(rng, 200), percentile, rule=rule)


def test_decisions_and_fired_rules():
    calibration = _calibration()
    t_img, t_px = calibration["thresholds"]["image"], calibration["thresholds"]["max"]
    image = np.array([t_img + 1, t_img + 1, t_img, t_img - 1])
    pixel = np.array([t_px + 1, t_px - 1, t_px + 1, t_px])  # equal is not above
    decisions, fired = calib.decide(calibration, image, pixel)
    assert fired == ["both", "image", "pixel", "none"]
    assert decisions.tolist() == [True, True, False, False]
    for rule, expected in {
        "pixel": [True, False, True, False],
        "either": [True, True, True, False],
        "both": [True, False, False, False],
    }.items():
        assert calib.decide(calibration, image, pixel, rule=rule)[0].tolist() == expected


def test_z_score_and_heat_scale():
    calibration = _calibration()
    stats = calibration["stats"]["image"]
    np.testing.assert_allclose(
        calib.z_score(np.array([stats["mean"], stats["mean"] + 2 * stats["std"]]), stats), [0, 2]
    )
    low = calibration["stats"]["mean"]["median"]
    mid = calibration["thresholds"]["max"]
    heat = calib.heat(np.array([[low - 5, low, mid, 2 * mid - low, 1e9]]), calibration)
    np.testing.assert_allclose(heat, [[0.0, 0.0, 0.5, 1.0, 1.0]])


def _roc_tpr_at(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Brute force over every threshold `score >= t`."""
    best = 0.0
    for threshold in np.concatenate([scores, [np.inf]]):
        predicted = scores >= threshold
        if predicted[labels == 0].mean() <= target:
            best = max(best, predicted[labels == 1].mean())
    return best


def test_tpr_at_fpr_matches_the_roc_curve():
    assert calib.tpr_at_fpr(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1]), 0.0) == 0.5
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # ties on purpose
    for target in (0.0, 0.01, 0.05, 0.3):
        assert calib.tpr_at_fpr(scores, labels, target) == _roc_tpr_at(scores, labels, target)
    assert math.isnan(calib.tpr_at_fpr(scores, np.zeros(300), 0.01))


def test_label_report_uses_the_shared_metrics_and_counts_the_confusion_matrix():
    rng = np.random.default_rng(7)
    labels = np.array([0] * 20 + [1] * 10)
    image, pixel = rng.normal(size=30) + labels, rng.normal(size=30)
    decisions = image > 0.5
    report = calib.label_report(image, pixel, decisions, labels)
    assert report["ranking"]["image_score"]["auroc"] == auroc(image, labels)
    assert report["ranking"]["map_score"]["ap"] == average_precision(pixel, labels)
    matrix = report["at_thresholds"]
    assert matrix["tp"] == int((decisions & (labels == 1)).sum())
    assert matrix["fp"] + matrix["tn"] == 20 and matrix["tp"] + matrix["fn"] == 10
    assert matrix["fpr"] == pytest.approx(matrix["fp"] / 20)
    text = calib.format_report(report)
    assert "| image_score |" in text and "TPR@FPR1%" in text and "TPR@FPR5%" in text


def _complete(percentile: float = 99.5) -> dict:
    """A calibration with every key `calibrate` writes beside the numbers."""
    return {
        **_calibration(percentile),
        "preprocessing": Preprocessing(64).to_dict(),
        "tiling": None,
        "class_name": "object",
        "domain": "Industrial",
        "amp": "none",
        "model": {"name": "aaclip", "checkpoint_sha256": "0" * 64},
        "graph": {"backend": "torch"},
        "overrides": {},
    }


def test_calibration_file_round_trip(tmp_path):
    calibration = _complete(99.9)
    (tmp_path / "save").mkdir()
    assert calib.calibration_path(tmp_path / "save") == tmp_path / "save" / "calibration.json"
    assert calib.calibration_path(tmp_path / "run" / "feclip.pth").name == "feclip.calibration.json"
    path = calib.save_calibration(calib.calibration_path(tmp_path / "save"), calibration)
    loaded = calib.load_calibration(path)
    assert (
        loaded["thresholds"] == calibration["thresholds"]
        and loaded["format"] == calib.FORMAT_VERSION == 2
    )
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary left
    with pytest.raises(CheckpointError, match="run `predict.py calibrate` first"):
        calib.load_calibration(tmp_path / "missing.json")
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="recalibrate"):
        calib.load_calibration(path)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["thresholds"].update(image=float("nan")), "thresholds.image is nan"),
        (lambda c: c["thresholds"].update(max=float("inf")), "thresholds.max is inf"),
        (lambda c: c["stats"]["image"]["percentiles"].update(x=float("nan")), "NaN or Infinity"),
        (lambda c: c["thresholds"].update(image="0.5"), "thresholds.image is '0.5'"),
        (lambda c: c.pop("stats"), "stats.image.mean is missing"),
        (lambda c: c["stats"]["max"].update(std=-1.0), "stats.max.std"),
        (lambda c: c.update(rule="majority"), "rule is 'majority'"),
        (lambda c: c.update(reduction="p99"), "reduction is 'p99'"),
        (lambda c: c.update(percentile=101), "percentile is 101"),
        (lambda c: c.update(percentile=True), "percentile is True"),
        (lambda c: c.update(top_fraction=0), "top_fraction is 0"),
        (lambda c: c.update(class_name=None), "class_name is None"),
        (lambda c: c.update(overrides=[]), "overrides is []"),
        (lambda c: c["model"].pop("name"), "model.name is missing"),
        (lambda c: c.update(tiling={"tile": "336"}), "tiling"),
        (lambda c: c.update(graph={"backend": "onnxruntime"}), "graph"),
        (lambda c: c["preprocessing"].pop("mean"), "preprocessing"),
    ],
)
def test_a_calibration_that_cannot_decide_is_refused_when_loaded(tmp_path, edit, named):
    calibration = _complete()
    edit(calibration)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"format": calib.FORMAT_VERSION, **calibration}))
    with pytest.raises(CheckpointError, match="recalibrate") as raised:
        calib.load_calibration(path)
    assert named in str(raised.value) and "\n" not in str(raised.value)


def test_a_truncated_calibration_is_one_line(tmp_path):
    path = calib.save_calibration(tmp_path / "calibration.json", _complete())
    path.write_text(path.read_text()[:200])
    with pytest.raises(CheckpointError, match="is not a calibration JSON") as raised:
        calib.load_calibration(path)
    assert "\n" not in str(raised.value)
