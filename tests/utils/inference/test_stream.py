"""The one prediction stream (utils/inference/stream.py): every reader's items in order, an
unreadable file as a result of its own, letterbox padding returned with its map, and a model-input
predictor and a native one giving the same image score for a whole image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.folder import ImageFolder
from models import backbone
from models.registry import MODELS
from utils.inference.predictor import AnomalyPredictor
from utils.inference.resolution import NativePredictor
from utils.inference.stream import item_loader, predict_images

SIDE = 64


@pytest.fixture
def folder(tmp_path):
    """Five files in name order: four images of other sizes and, third, a corrupt one."""
    rng = np.random.default_rng(0)
    for name, (height, width) in zip(
        ("a.png", "b.jpg", "d.png", "e.png"),
        ((64, 64), (40, 120), (90, 30), (64, 200)),
        strict=True,
    ):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"not a png")
    return tmp_path


def predictor_of(name: str, **overrides) -> AnomalyPredictor:
    torch.manual_seed(0)
    config = MODELS[name].config_class(model_name="tiny", img_size=SIDE, **overrides)
    return AnomalyPredictor(MODELS[name](config, backbone.tiny_clip(SIDE)))


def test_items_come_out_in_order_with_errors_and_valid_masks(folder):
    predictor = predictor_of("feclip", preprocess="letterbox")
    dataset = ImageFolder(folder, predictor.preprocessing)
    loader = item_loader(dataset, predictor, batch_size=2, num_workers=0)
    results = list(predict_images(predictor, loader, "object", show_progress=False))
    assert [result.item.file for result in results] == ["a.png", "b.jpg", "c.png", "d.png", "e.png"]
    broken = results[2]
    assert broken.error and broken.anomaly_map is None and np.isnan(broken.image_score)
    for result in results[:2] + results[3:]:
        assert not result.error and result.anomaly_map.shape == (SIDE, SIDE)
        assert result.valid.shape == (SIDE, SIDE) and result.image.shape == (3, SIDE, SIDE)
    wide = results[1].valid  # 120 x 40 letterboxed: rows of padding above and below
    assert not wide[0].any() and wide[SIDE // 2].all()
    # each image alone gives what it gave in its batch of two
    for result in results[:2] + results[3:]:
        alone = predictor.predict(
            result.image[None], ["object"], torch.from_numpy(result.valid)[None]
        )
        assert float(alone.image_score[0]) == pytest.approx(result.image_score, abs=1e-6)


def test_a_native_predictor_maps_each_image_at_its_own_size_with_the_same_score(folder):
    predictor = predictor_of("aaclip")
    whole = ImageFolder(folder, predictor.preprocessing)
    by_input = list(
        predict_images(predictor, item_loader(whole, predictor, 4), "object", show_progress=False)
    )
    native = NativePredictor(predictor)
    read = ImageFolder(folder, native.preprocessing, native=True)
    by_image = list(
        predict_images(native, item_loader(read, native, 4), "object", show_progress=False)
    )
    assert [r.item.file for r in by_image] == [r.item.file for r in by_input]
    for at_input, at_image in zip(by_input, by_image, strict=True):
        if at_input.error:
            assert at_image.error and at_image.anomaly_map is None
            continue
        height, width = at_image.item.geometry.height, at_image.item.geometry.width
        assert at_image.anomaly_map.shape == (height, width) and at_image.valid is None
        assert at_image.image_score == pytest.approx(at_input.image_score, abs=1e-6)
        # resized back bilinearly: within the input map's range
        assert at_image.anomaly_map.max() <= at_input.anomaly_map.max() + 1e-5
        assert at_image.anomaly_map.min() >= at_input.anomaly_map.min() - 1e-5


def test_a_square_preprocessing_returns_no_valid_mask(folder):
    predictor = predictor_of("sowa")
    dataset = ImageFolder(folder, predictor.preprocessing)
    (first, *_) = predict_images(predictor, item_loader(dataset, predictor, 8), "object", False)
    assert first.valid is None  # square: every pixel of the input is the image
