"""MVTec AD 2 through test.py on the tiny backbone and the miniature tree: test_public with its
columns and SegF1 thresholds from validation/good, the private splits' submission, and what
stays refused on unlabelled records."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

import test as test_script
import train
from datasets.catalog import mvtec_ad2_info
from datasets.metadata import build_records
from datasets.preprocessing import read_image
from models.registry import load_trained_model
from utils.evaluation.evaluate import EvalConfig
from utils.evaluation.metrics import COLUMNS_MVTEC_AD2, ClassEvaluator, ValidationThreshold
from utils.evaluation.submission import check_submission
from utils.inference.predictor import AnomalyPredictor
from utils.inference.resolution import NativePredictor, TiledPredictor

# A few tiles per image: 64 px tiles of the images shrunk to 5 % (the tree's are 1000-2232 px).
TILE = ["--tile", "64", "--tile_scale", "0.05"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, mvtec_ad2_root):
    """An FE-CLIP trained one epoch on test_public (records in a folder of its own)."""
    folder = tmp_path_factory.mktemp("mvtec_ad2_cli")
    common = ["--dataset", "MVTecAD2", "--data_root", str(mvtec_ad2_root), "--device", "cpu"]
    common += ["--metadata_dir", str(folder / "meta")]
    argv = ["--model", "feclip", "--save_path", str(folder / "run"), "--epochs", "1"]
    assert train.main([*common, *argv, "--batch_size", "8", "--model_name", "tiny"]) == 0
    return folder, [*common, "--save_path", str(folder / "run")]


def validation_maps(checkpoint, root, tiled: bool) -> list[np.ndarray]:
    """Each validation/good map as test.py's predictor gives it, computed here directly."""
    _, model, _ = load_trained_model(checkpoint)
    predictor = AnomalyPredictor(model)
    maps = []
    records = build_records(mvtec_ad2_info("validation"), root)
    config = EvalConfig(tile=64, tile_scale=0.05)
    # at each image's own resolution: stitched from tiles, or the whole image's map resized
    native = TiledPredictor(predictor, config, 32) if tiled else NativePredictor(predictor)
    for record in records:
        name = mvtec_ad2_info().real_names[record["class_name"]]
        image = read_image(root / record["image_path"], predictor.preprocessing.pad_color)
        maps.append(native.predict_image(image, name).anomaly_map)
    return maps


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
def test_test_public_has_mvtec_ad2_columns_and_validation_thresholds(
    run, mvtec_ad2_root, tmp_path, tiled
):
    folder, argv = run
    extra = [*TILE] if tiled else ["--save_maps", str(tmp_path / "maps")]
    assert test_script.main([*argv, "--results_dir", str(tmp_path), *extra]) == 0
    (path,) = tmp_path.glob("results_MVTecAD2*.json")
    results = json.loads(path.read_text())
    assert results["columns"] == COLUMNS_MVTEC_AD2
    assert results["meta"]["config"]["metrics"] == "mvtec_ad2"  # the default for MVTecAD2
    assert results["meta"]["metric_resolution"] == "native"  # MVTec AD 2's protocol
    thresholds = results["meta"]["seg_thresholds"]
    assert set(thresholds) == {"can", "fabric", "vial"}
    records = build_records(mvtec_ad2_info("validation"), mvtec_ad2_root)
    maps = validation_maps(folder / "run", mvtec_ad2_root, tiled)
    for class_name, expected in thresholds.items():
        threshold = ValidationThreshold()
        for record, anomaly_map in zip(records, maps, strict=True):
            if record["class_name"] == class_name:
                threshold.update(anomaly_map[None])
        assert threshold.compute() == expected
    if not tiled:  # full-resolution float16 maps, good and bad apart
        saved = tifffile.imread(tmp_path / "maps" / "vial" / "test_public" / "bad" / "001.tiff")
        image = Image.open(mvtec_ad2_root / "vial" / "test_public" / "bad" / "001.png")
        assert saved.dtype == np.float16 and saved.shape == image.size[::-1]
        assert len(list((tmp_path / "maps").rglob("*.tiff"))) == 12


def test_private_splits_write_a_submission_that_passes_the_check(
    run, mvtec_ad2_root, tmp_path, caplog
):
    _, argv = run
    submission = tmp_path / "submission"
    argv = [*argv, "--results_dir", str(tmp_path), "--submission", str(submission)]
    with caplog.at_level(logging.INFO):
        assert test_script.main([*argv, "--split", "test_private"]) == 0
        assert "no metric is computed" in caplog.text
        assert "submission not complete yet" in caplog.text  # test_private_mixed still to come
        assert test_script.main([*argv, "--split", "test_private_mixed"]) == 0
    assert "checked: 18 images, ready for upload" in caplog.text
    assert check_submission(submission, mvtec_ad2_root) == 18
    results = json.loads((tmp_path / "results_MVTecAD2_test_private_mixed.json").read_text())
    assert results["columns"] == [] and set(results["meta"]["seg_thresholds"]) == {
        "can",
        "fabric",
        "vial",
    }


def test_private_split_without_submission_is_a_one_line_error(run, tmp_path, one_line_error):
    _, argv = run
    argv = [*argv, "--results_dir", str(tmp_path), "--split", "test_private"]
    assert test_script.main(argv) == 2
    assert "--submission DIR" in one_line_error()


@pytest.mark.parametrize("extra", [[], ["--training_mode", "few_shot", "--shot", "2"]])
def test_training_on_a_private_split_stays_refused(mvtec_ad2_root, tmp_path, one_line_error, extra):
    argv = ["--model", "feclip", "--dataset", "MVTecAD2", "--data_root", str(mvtec_ad2_root)]
    argv += ["--split", "test_private", "--metadata_dir", str(tmp_path), "--device", "cpu"]
    argv += ["--save_path", str(tmp_path / "run"), "--model_name", "tiny", *extra]
    assert train.main(argv) == 2
    assert "test_public" in one_line_error()


def test_whole_images_are_scored_at_native_resolution_unless_asked(
    run, mvtec_ad2_root, tmp_path, monkeypatch, one_line_error
):
    """MVTec AD 2 without tiles: the map resized back to each image against its full-resolution
    mask (every defect pixel counted); `--metric_resolution input` is the papers' protocol."""
    _, argv = run
    seen: list[tuple[tuple[int, ...], int]] = []
    update = ClassEvaluator.update

    def spy(self, maps, masks, valid=None):
        seen.append((np.shape(masks)[1:], int(np.count_nonzero(masks))))
        return update(self, maps, masks, valid)

    monkeypatch.setattr(ClassEvaluator, "update", spy)
    argv = [*argv, "--results_dir", str(tmp_path)]
    assert test_script.main(argv) == 0
    masks = sorted(mvtec_ad2_root.glob("*/test_public/ground_truth/bad/*_mask.png"))
    defect_pixels = sum(int(np.count_nonzero(np.asarray(Image.open(path)))) for path in masks)
    sizes = {Image.open(path).size[::-1] for path in masks}
    assert {shape for shape, _ in seen} == sizes and sum(n for _, n in seen) == defect_pixels
    seen.clear()
    assert test_script.main([*argv, "--metric_resolution", "input"]) == 0
    side = load_trained_model(run[0] / "run")[1].config.img_size
    assert {shape for shape, _ in seen} == {(side, side)}
    results = json.loads((tmp_path / "results_MVTecAD2_input.json").read_text())
    assert results["meta"]["metric_resolution"] == "input"
    assert test_script.main([*argv, "--metric_resolution", "input", *TILE]) == 2
    assert "drop --metric_resolution input" in one_line_error()
