"""utils/evaluation/visualize.py: panel layout, RGB order, colour map and valid masks."""

import numpy as np
from PIL import Image

from utils.evaluation.visualize import TURBO_LUT, apply_colormap, mask_overlay, overlay, save_panels


def red_image(height: int = 8, width: int = 10) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = 255
    return image


def test_colormap_lookup_table():
    assert TURBO_LUT.shape == (256, 3)
    assert TURBO_LUT.dtype == np.uint8
    colours = apply_colormap(np.array([[0.0, 0.5, 1.0, np.nan]]))
    assert colours.shape == (1, 4, 3)
    np.testing.assert_array_equal(colours[0, 0], TURBO_LUT[0])
    np.testing.assert_array_equal(colours[0, 2], TURBO_LUT[255])
    np.testing.assert_array_equal(colours[0, 3], TURBO_LUT[0])
    low, high = TURBO_LUT[25].astype(int), TURBO_LUT[230].astype(int)
    assert low[2] > low[0] + 100  # turbo: blue at the low end
    assert high[0] > high[2] + 100  # red at the high end


def test_overlay_respects_valid_mask():
    image = red_image()
    valid = np.zeros((8, 10), dtype=bool)
    valid[:, :5] = True
    out = overlay(image, np.ones((8, 10)), alpha=0.5, valid_mask=valid)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 5:], image[:, 5:])
    assert not np.array_equal(out[:, :5], image[:, :5])


def test_mask_overlay_only_touches_the_mask():
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True
    out = mask_overlay(image, mask)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask] != image[mask]).any(axis=-1).all()


def test_save_panels_layout_and_rgb_order(tmp_path):
    image = red_image()
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:3] = True
    path = save_panels(tmp_path / "a" / "b" / "panel.png", image, np.random.rand(4, 5), mask=mask)
    with Image.open(path) as saved:
        assert saved.mode == "RGB"
        assert saved.size == (30, 8)
        pixels = np.asarray(saved)
    np.testing.assert_array_equal(pixels[:, :10], image)  # still red: no BGR swap
    path = save_panels(tmp_path / "no_mask.png", image, np.zeros((8, 10)))
    with Image.open(path) as saved:
        assert saved.size == (20, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "no_mask.png"]
