"""Field-image folders: listing, robust loading, letterbox geometry and the token-grid mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.folder import ImageFolder, list_images
from datasets.preprocessing import CLIP_MEAN, CLIP_STD, Preprocessing, read_image
from models.forward_utils import token_valid_mask
from utils.core.errors import DataError


def letterbox(image: Image.Image, size: int, pad_color=(255, 255, 255)):
    return Preprocessing(size, "letterbox", pad_color=pad_color)(image)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.jpg", "sub/c.JpEg", "notes.txt", "sub/d.tiff"):
        (tmp_path / name).write_bytes(b"x")
    names = [path.relative_to(tmp_path).as_posix() for path in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "sub/c.JpEg", "sub/d.tiff"]


def test_empty_or_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        list_images(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        list_images(tmp_path / "missing")


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 32768]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(read_image(path))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert expected.tolist() == [[0, 100, 255, 128]]  # PIL's convert("L") would clip to 255
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_grayscale_palette_and_rgba(tmp_path):
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    gray.save(tmp_path / "gray.png")
    rgb = np.asarray(read_image(tmp_path / "gray.png"))
    assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == np.asarray(gray)).all()

    _noise(5, 4).convert("P").save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png").mode == "RGB"

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[1, 1] = (10, 20, 30, 0)  # transparent: becomes the pad colour
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    out = np.asarray(read_image(tmp_path / "alpha.png", pad_color=(0, 255, 0)))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (0, 255, 0)


def test_exif_orientation_is_applied_and_plain_files_are_read_as_they_are(tmp_path):
    picture = _noise(6, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was rotated; show it rotated 90 degrees clockwise
    picture.save(tmp_path / "rotated.png", exif=exif)
    picture.save(tmp_path / "plain.png")
    expected = np.asarray(picture.transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "rotated.png")), expected)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "plain.png")), picture)


def test_corrupt_file_is_an_error_item_not_an_exception(tmp_path):
    _noise(8, 8).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="cannot read image"):
        read_image(tmp_path / "broken.png")
    items = [ImageFolder(tmp_path, Preprocessing(16))[index] for index in range(2)]
    assert [item.file for item in items] == ["broken.png", "good.png"]
    assert "cannot read image" in items[0].error and items[0].image is None
    assert items[1].error == "" and items[1].image.shape == (3, 16, 16)


@pytest.mark.parametrize("width,height", [(37, 100), (100, 37), (64, 63), (1, 90), (64, 64)])
def test_letterbox_geometry_on_odd_aspect_ratios(width, height):
    size = 64
    tensor, valid, geometry = letterbox(_noise(width, height), size, pad_color=(255, 255, 255))
    scale = size / max(width, height)
    assert (geometry.content_width, geometry.content_height) == (
        max(1, round(width * scale)),
        max(1, round(height * scale)),
    )
    assert geometry.top == (size - geometry.content_height) // 2
    assert geometry.left == (size - geometry.content_width) // 2
    assert valid.dtype == torch.bool and int(valid.sum()) == (
        geometry.content_width * geometry.content_height
    )
    rows, cols = torch.nonzero(valid, as_tuple=True)
    assert rows.min() == geometry.top and cols.min() == geometry.left
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    padding = tensor.permute(1, 2, 0)[~valid]  # [n_pad, 3]
    torch.testing.assert_close(padding, white.expand_as(padding))
    # back to the original size, the padding never leaks into the map
    anomaly_map = np.where(valid.numpy(), 0.25, 1e6).astype(np.float32)
    back = geometry.to_original(anomaly_map)
    assert back.shape == (height, width)
    np.testing.assert_allclose(back, 0.25)


def test_square_and_short_side_crop_geometries_map_back_to_what_the_model_saw():
    image = _noise(50, 30)
    _, valid, geometry = Preprocessing(32)(image)
    assert valid.all() and geometry.content_height == geometry.content_width == 32
    assert geometry.to_original(np.zeros((32, 32))).shape == (30, 50)
    cropped = Preprocessing(32, "short_side_crop")
    _, valid, geometry = cropped(image)
    assert valid.all() and geometry.crop == (10, 0, 40, 30)  # the centred 30 x 30
    assert geometry.to_original(np.zeros((32, 32))).shape == (30, 30)
    assert cropped.seen_region(image).size == (30, 30)


def _brute_force_tokens(valid: torch.Tensor, grid: int, min_fraction: float) -> torch.Tensor:
    patch = valid.shape[-1] // grid
    out = torch.zeros(grid, grid, dtype=torch.bool)
    for row in range(grid):
        for col in range(grid):
            cell = valid[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
            out[row, col] = cell.float().sum() / patch**2 >= min_fraction
    return out


@pytest.mark.parametrize("min_fraction", [0.5, 1.0, 1 / 64])
@pytest.mark.parametrize("width,height", [(37, 100), (100, 41), (64, 20), (90, 60)])
def test_token_mask_is_exact_at_the_token_grid(width, height, min_fraction):
    _, valid, _ = letterbox(_noise(width, height), 64)
    tokens = token_valid_mask(valid, grid=8, min_fraction=min_fraction)
    assert tokens.shape == (8, 8)
    torch.testing.assert_close(tokens, _brute_force_tokens(valid, 8, min_fraction))


def test_token_mask_of_a_patch_aligned_letterbox_is_the_content_tokens():
    _, valid, geometry = letterbox(_noise(64, 32), 64)  # rows 16:48 valid = token rows 2:6
    assert (geometry.top, geometry.content_height) == (16, 32)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6] = True
    for min_fraction in (1 / 64, 0.5, 1.0):
        torch.testing.assert_close(token_valid_mask(valid[None], 8, min_fraction)[0], expected)
