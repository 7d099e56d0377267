"""Tiled inference through the one predict path (utils/inference/resolution.py): one tile is the
whole-image prediction for every model, blends have no seams and follow the documented formula,
the image score is the tiles' maximum, SOWA's memory comes from support tiles, an export scores
tiles as the checkpoint does, and a 5000 px image holds a bounded number of full-resolution
maps."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.preprocessing import Preprocessing
from datasets.tiling import TileConfig, tile_grid
from models import backbone
from models.base import AnomalyOutput
from models.registry import MODELS
from tests.test_deploy import installed
from utils.inference.predictor import AnomalyPredictor
from utils.inference.resolution import TiledPredictor

SIDE = 64  # the tiny model's input


def tiny_model(name: str, **overrides):
    config = MODELS[name].config_class(model_name="tiny", img_size=SIDE, **overrides)
    return MODELS[name](config, backbone.tiny_clip(SIDE, quick_gelu=config.quick_gelu))


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("side", [SIDE, 100])  # the input itself; a tile resized to it
@pytest.mark.parametrize("name", list(MODELS))
def test_one_tile_over_the_whole_image_is_the_untiled_prediction(name, side):
    torch.manual_seed(0)
    predictor = AnomalyPredictor(tiny_model(name))
    image = noise(side, side)
    prepared = predictor.preprocessing(image)
    whole = predictor.predict(prepared.image[None], ["object"], prepared.valid_mask[None])
    expected = prepared.geometry.to_original(whole.anomaly_map[0].numpy())  # [side, side]
    tiled = TiledPredictor(predictor, TileConfig(tile=side), 4).predict_image(image, "object")
    assert tiled.anomaly_map.shape == (side, side)
    np.testing.assert_allclose(tiled.anomaly_map, expected, rtol=1e-5, atol=1e-6)
    assert tiled.image_score == pytest.approx(float(whole.image_score[0]), abs=1e-7)


class PatternPredictor:
    """A stand-in model: tile t's map is `value(t)` everywhere, its image score t (tiles are
    numbered in the order they are predicted)."""

    preprocessing = Preprocessing(size=32)
    domain, amp, device = "Industrial", "none", torch.device("cpu")

    def __init__(self, value) -> None:
        self.value = value
        self.count = 0

    def predict(self, images, class_names, valid_mask=None) -> AnomalyOutput:
        batch = len(images)
        numbers = torch.arange(self.count, self.count + batch, dtype=torch.float32)
        self.count += batch
        maps = torch.stack([torch.full((32, 32), float(self.value(int(t)))) for t in numbers])
        return AnomalyOutput(maps, numbers)


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_a_constant_model_stitches_without_seams(scale):
    tiling = TileConfig(tile=48, tile_overlap=0.3, tile_scale=scale)
    predictor = TiledPredictor(PatternPredictor(lambda t: 0.37), tiling, batch_size=5)
    output = predictor.predict_image(noise(173, 151), "object")
    assert output.anomaly_map.shape == (173, 151) and output.anomaly_map.dtype == np.float32
    np.testing.assert_allclose(output.anomaly_map, 0.37, rtol=0, atol=1e-6)


def test_the_blend_of_per_tile_values_and_the_image_score_follow_the_documented_rules():
    size, height, width, floor = 48, 110, 130, 0.01
    predictor = TiledPredictor(
        PatternPredictor(lambda t: 10.0 * t), TileConfig(tile=size, tile_overlap=0.25), 3
    )
    output = predictor.predict_image(noise(height, width), "object")
    positions = tile_grid(height, width, size, 0.25)
    profile = np.maximum(floor, 1 - np.abs(2 * (np.arange(size) + 0.5) / size - 1))
    total, weight = np.zeros((height, width)), np.zeros((height, width))
    for number, (top, left) in enumerate(positions):  # M = sum w_t m_t / sum w_t
        window = np.outer(profile, profile)
        total[top : top + size, left : left + size] += window * 10.0 * number
        weight[top : top + size, left : left + size] += window
    np.testing.assert_allclose(output.anomaly_map, total / weight, rtol=1e-5)
    assert output.image_score == len(positions) - 1  # the maximum over the tiles' scores


def test_sowa_builds_its_k_shot_memory_from_support_tiles(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("sowa")
    predictor = TiledPredictor(AnomalyPredictor(model, k_shot=2), TileConfig(tile=48), 4)
    paths = []
    for index, (height, width) in enumerate(((100, 90), (60, 48))):
        paths.append(tmp_path / f"good_{index}.png")
        noise(height, width, index).save(paths[-1])
    tiles = predictor.support_images(paths)
    assert tiles.shape == (9 + 2, 3, SIDE, SIDE)  # 3 x 3 tiles, then 2 x 1
    predictor.set_support(tiles)
    grid = backbone.grid_size(model.clipmodel)
    memory = predictor.predictor._memory
    assert all(stage.shape[0] == len(tiles) * grid * grid for stage in memory)
    output = predictor.predict_image(noise(70, 120, 5), "object")
    assert output.anomaly_map.shape == (70, 120) and np.isfinite(output.anomaly_map).all()


def test_a_5000_px_image_holds_a_few_full_resolution_maps():
    class Zeros(PatternPredictor):
        def __init__(self) -> None:
            super().__init__(lambda t: 0.0)

    predictor = TiledPredictor(Zeros(), TileConfig(tile=1024, tile_overlap=0.25), 8)
    image = Image.new("RGB", (5000, 5000), (128, 128, 128))
    full_map = 5000 * 5000 * 4
    tracemalloc.start()
    try:
        output = predictor.predict_image(image, "object")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert output.anomaly_map.shape == (5000, 5000)
    assert peak < 2.5 * full_map  # the weighted sum and the weights; tiles are small


@pytest.mark.skipif(
    not all(installed(module) for module in ("onnx", "onnxscript", "onnxruntime")),
    reason="the deployment extra (requirements-deploy.txt) is not installed",
)
def test_an_export_scores_tiles_as_the_checkpoint_does(tmp_path):
    from utils.deploy.export import export
    from utils.inference.graph import ExportedPredictor

    torch.manual_seed(0)
    predictor = AnomalyPredictor(tiny_model("feclip", preprocess="letterbox"))  # valid masks in
    info = {
        "model": {"name": "feclip", "checkpoint_sha256": "0" * 64},
        "classes": [{"name": "object", "prompt": "object"}],
        "k_shot": 0,
    }
    export(predictor, tmp_path, ["onnx"], ["object"], info)
    exported = ExportedPredictor(tmp_path, "onnxruntime")
    tiling = TileConfig(tile=48, tile_overlap=0.3)
    image = noise(40, 130)  # shorter than a tile: padded tiles
    ours = TiledPredictor(predictor, tiling, 4).predict_image(image, "object")
    theirs = TiledPredictor(exported, tiling, 4).predict_image(image, "object")
    np.testing.assert_allclose(theirs.anomaly_map, ours.anomaly_map, rtol=0, atol=1e-4)
    assert theirs.image_score == pytest.approx(ours.image_score, abs=1e-4)
