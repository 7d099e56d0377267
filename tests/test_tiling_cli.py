"""High-resolution images end to end on the tiny backbone and the synthetic set: training on
native crops (`--train_tile`), test.py scoring by tiles against full-resolution masks, and
predict.py calibrating and scoring by tiles with overlays at each image's resolution."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

import predict
import test as test_script
import train
from models import backbone
from models.registry import MODELS
from utils.deploy import calibration as calib
from utils.deploy.review import picture_names
from utils.evaluation import evaluate
from utils.inference.predictor import AnomalyPredictor
from utils.inference.resolution import TiledPredictor
from utils.inference.support import set_class_support, support_paths

CLASS = "tile"
TILE = ["--tile", "48", "--tile_overlap", "0.25"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """An AA-CLIP trained a few steps on 48 px native crops of the 96 px synthetic images."""
    data_root = tmp_path_factory.mktemp("tiling") / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    run = data_root.parent / "run"
    argv = ["--data_root", str(data_root), "--save_path", str(run), "--device", "cpu"]
    argv += ["--text_epoch", "1", "--image_epoch", "1", "--shot", "4", "--train_tile", "48"]
    assert train.main(argv) == 0
    return data_root, run


def test_train_tile_trains_and_is_recorded(trained):
    _, run = trained
    assert (run / "image_adapter.pth").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["train_tile"] == 48


def test_test_py_scores_tiles_against_full_resolution_masks(
    trained, tmp_path, monkeypatch, one_line_error
):
    data_root, run = trained
    shapes = set()
    update = evaluate.ClassEvaluator.update

    def spy(self, maps, masks, valid=None):
        shapes.add((np.shape(maps), np.shape(masks)))
        return update(self, maps, masks, valid)

    monkeypatch.setattr(evaluate.ClassEvaluator, "update", spy)
    argv = ["--save_path", str(run), "--data_root", str(data_root), "--device", "cpu"]
    argv += ["--results_dir", str(tmp_path), *TILE, "--tile_scale", "0.75"]
    assert test_script.main(argv) == 0
    assert shapes == {((1, 96, 96), (1, 96, 96))}  # the synthetic images' own size
    (path,) = tmp_path.glob("results_Synthetic*.json")  # the file name may tag the tiling
    results = json.loads(path.read_text())
    assert results["meta"]["tiling"] == {"tile": 48, "overlap": 0.25, "scale": 0.75}
    assert set(results["per_class"]) == {"tile", "stripes", "dots"}
    for metrics in results["per_class"].values():
        assert all(np.isfinite(value) for value in metrics.values())
    assert test_script.main([*argv, "--visualize"]) == 2  # panels are at the model input
    assert "--visualize" in one_line_error()


@pytest.fixture(scope="module")
def field_images(trained):
    """Images of three sizes: a synthetic test image, the same at 200 x 150, and one smaller
    than a tile (padded, not upscaled)."""
    data_root, _ = trained
    folder = data_root.parent / "field"
    folder.mkdir()
    source = sorted((data_root / CLASS / "test").rglob("*.png"))[0]
    picture = Image.open(source).convert("RGB")
    picture.save(folder / "a_native.png")
    picture.resize((200, 150), Image.Resampling.BICUBIC).save(folder / "b_large.png")
    picture.crop((0, 0, 40, 30)).save(folder / "c_small.png")
    return folder


def test_predict_py_calibrates_and_scores_by_tiles_at_full_resolution(
    trained, field_images, tmp_path, one_line_error
):
    data_root, run = trained
    normal = data_root / CLASS / "train" / "good"
    calibration_file = tmp_path / "calibration.json"
    argv = ["calibrate", "--checkpoint", str(run), "--normal_dir", str(normal), *TILE]
    assert predict.main([*argv, "--device", "cpu", "--output", str(calibration_file)]) == 0
    calibration = calib.load_calibration(calibration_file)
    assert calibration["tiling"] == {"tile": 48, "overlap": 0.25, "scale": 1.0}
    out = tmp_path / "scored"
    argv = ["score", "--checkpoint", str(run), "--input", str(field_images), "--out", str(out)]
    argv += ["--calibration", str(calibration_file), "--device", "cpu"]
    assert predict.main([*argv, *TILE]) == 0
    with open(out / "scores.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"a_native.png", "b_large.png", "c_small.png"}
    names = picture_names(sorted(rows))
    for name, row in rows.items():
        assert row["error"] == "" and np.isfinite(float(row["image_score"]))
        overlay = Image.open(out / names[name].overlay)
        assert overlay.size == Image.open(field_images / name).size
    assert predict.main(argv) == 2  # calibrated by tiles: scoring whole images is refused
    assert "--tile 48 --tile_overlap 0.25 --tile_scale 1" in one_line_error()


def test_sowa_k_shot_support_is_tiled_like_the_test_images(synthetic_root):
    config = evaluate.EvalConfig(data_root=synthetic_root, k_shot=1, tile=48)
    model_config = MODELS["sowa"].config_class(model_name="tiny", img_size=64)
    model = MODELS["sowa"](model_config, backbone.tiny_clip(64))
    predictor = TiledPredictor(AnomalyPredictor(model, k_shot=1), config, 8)
    paths = support_paths(config, CLASS, True, config.dataset_info(), synthetic_root)
    assert len(paths) == 1
    set_class_support(predictor, paths)
    tiles = 3 * 3  # a 96 px image under 48 px tiles overlapping by 0.25: starts 0, 36, 48
    grid = backbone.grid_size(model.clipmodel)
    assert all(stage.shape[0] == tiles * grid * grid for stage in predictor.predictor._memory)
