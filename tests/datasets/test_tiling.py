"""Tile grid, blend window and stitcher (datasets/tiling.py), and the training crops at native
resolution (`--train_tile`, datasets/anomaly.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.anomaly import TrainDataset
from datasets.preprocessing import Preprocessing
from datasets.tiling import Stitcher, TileConfig, Tiler, tile_grid, tile_starts, tile_window


def test_tiles_start_every_stride_and_the_last_meets_the_edge():
    assert tile_starts(200, 64, 0.25) == [0, 48, 96, 136]
    assert tile_starts(64, 64, 0.5) == [0]
    assert tile_starts(40, 64, 0.25) == [-12]  # shorter than a tile: centred, padded
    for length, size, overlap in ((1000, 96, 0.0), (97, 96, 0.9), (4999, 518, 0.25)):
        starts = tile_starts(length, size, overlap)
        assert starts[0] == 0 and starts[-1] == length - size
        steps = np.diff(starts)
        assert (steps > 0).all() and (steps <= round(size * (1 - overlap))).all()
    assert tile_grid(100, 200, 64, 0.25) == [
        (top, left) for top in (0, 36) for left in (0, 48, 96, 136)
    ]


def window_by_hand(size: int, floor: float = 0.01) -> np.ndarray:
    """The README's window, one pixel at a time."""
    profile = [max(floor, 1 - abs(2 * (i + 0.5) / size - 1)) for i in range(size)]
    return np.array([[a * b for b in profile] for a in profile])


def test_the_blend_of_known_tiles_is_the_documented_formula():
    size, height, width = 16, 23, 37
    positions = tile_grid(height, width, size, 0.4)
    rng = np.random.default_rng(0)
    tile_maps = rng.normal(size=(len(positions), size, size)).astype(np.float32)
    stitcher = Stitcher(height, width, size)
    for tile_map, (top, left) in zip(tile_maps, positions, strict=True):
        stitcher.add(tile_map, top, left)
    window = window_by_hand(size)
    total, weight = np.zeros((height, width)), np.zeros((height, width))
    for tile_map, (top, left) in zip(tile_maps, positions, strict=True):
        for y in range(size):
            for x in range(size):
                total[top + y, left + x] += window[y, x] * tile_map[y, x]
                weight[top + y, left + x] += window[y, x]
    np.testing.assert_allclose(stitcher.result(), total / weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tile_window(size), window, rtol=1e-6)


def test_the_stitcher_holds_two_full_resolution_maps_on_a_5000_px_image():
    stitcher = Stitcher(5000, 5000, 518)
    held = stitcher.buffers()
    assert len(held) == 2
    assert all(array.shape == (5000, 5000) and array.dtype == np.float32 for array in held)
    assert stitcher.window.nbytes == 518 * 518 * 4  # one tile's window, not the image's
    for top, left in tile_grid(5000, 5000, 518, 0.25):
        stitcher.add(np.ones((518, 518), np.float32), top, left)
    result = stitcher.result()
    assert stitcher.buffers() == [result]  # divided in place: the weights are released
    assert result.min() == result.max() == 1.0


def test_a_small_image_is_padded_in_one_tile_not_upscaled():
    preprocessing = Preprocessing(size=32, pad_color=(0, 0, 255))
    tiler = Tiler(preprocessing, TileConfig(tile=32))
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    (batch,) = tiler.batches(image, 8)
    assert batch.positions == [(-11, -6)]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[11:21, 6:26] = True
    assert torch.equal(batch.valid_mask[0], expected)
    pixels = preprocessing.to_pixels(batch.images)[0]
    assert (pixels[expected.numpy()] == (255, 0, 0)).all()  # the image at its own size
    assert (pixels[~expected.numpy()] == (0, 0, 255)).all()  # the pad colour around it
    stitcher = Stitcher(10, 20, 32)
    stitcher.add(np.arange(32 * 32, dtype=np.float32).reshape(32, 32), -11, -6)
    expected_map = np.arange(32 * 32).reshape(32, 32)[11:21, 6:26]
    np.testing.assert_allclose(stitcher.result(), expected_map, rtol=1e-6)


def test_tiles_of_another_size_are_resized_to_the_input_and_their_valid_part_scaled():
    tiler = Tiler(Preprocessing(size=64), TileConfig(tile=32, tile_overlap=0.5, tile_scale=0.5))
    image = tiler.scaled(Image.new("RGB", (100, 40)))
    assert image.size == (50, 20)
    batches = list(tiler.batches(image, 2))
    assert [batch.images.shape for batch in batches] == [(2, 3, 64, 64), (1, 3, 64, 64)]
    assert [batch.positions for batch in batches] == [[(-6, 0), (-6, 16)], [(-6, 18)]]
    assert batches[0].valid_mask[0, 12:52].all() and not batches[0].valid_mask[0, :12].any()


@pytest.fixture
def striped_record(tmp_path):
    """A 90 x 120 image, red exactly where its mask marks a 10 x 14 defect."""
    pixels = np.zeros((90, 120, 3), np.uint8)
    pixels[..., 1] = np.arange(120, dtype=np.uint8)[None]  # every column its own green
    mask = np.zeros((90, 120), np.uint8)
    mask[60:70, 100:114] = 255
    pixels[mask > 0] = (255, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "bad.png")
    Image.fromarray(mask).save(tmp_path / "bad_mask.png")
    Image.fromarray(pixels[:30, :40]).save(tmp_path / "small.png")
    return [
        {"image_path": "bad.png", "mask_path": "bad_mask.png", "label": 1, "class_name": "x"},
        {"image_path": "small.png", "mask_path": "", "label": 0, "class_name": "x"},
    ]


def test_train_crops_are_native_tiles_with_their_mask_crops_aligned(striped_record, tmp_path):
    preprocessing = Preprocessing(size=32)
    dataset = TrainDataset(striped_record, tmp_path, preprocessing, augment=False, tile=32)
    torch.manual_seed(0)
    for _ in range(10):
        item = dataset[0]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
        assert item["label"] == 1 and item["mask"].any()  # the crop holds the defect
        pixels = preprocessing.to_pixels(item["image"][None])[0]
        red = (pixels == (255, 0, 0)).all(axis=-1)
        assert np.array_equal(red, item["mask"][0].numpy() > 0)  # the same crop
    small = dataset[1]  # 40 x 30 under a 32 tile: cropped across, padded down
    assert small["image"].shape == (3, 32, 32) and not small["mask"].any()
    resized = TrainDataset(striped_record, tmp_path, Preprocessing(size=64), augment=False, tile=48)
    item = resized[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["mask"].any()
