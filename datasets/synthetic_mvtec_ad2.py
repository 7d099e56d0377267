"""A miniature MVTec AD 2 tree in the publisher's exact layout and naming, deterministic from a
seed (tests of the MVTecAD2 loader, its metrics and the benchmark submission).

Three of its eight classes at its kind of size: `can` 2232 x 1024 RGB (wide), `fabric`
1280 x 1280 RGB, `vial` 1000 x 1400 grayscale (tall; vial, sheet_metal and wallplugs ship
single-channel images). Per class:

* `train/good/000.png` ... (2) and `validation/good/000.png` ... (2), normal;
* `test_public/good/000.png`, `001.png` and `test_public/bad/000.png`, `001.png`: the stems
  repeat between good and bad as in the download; masks
  `test_public/ground_truth/bad/<stem>_mask.png` (0/255) mark exactly the painted pixels;
* `test_private/NNN_regular.png` and `test_private_mixed/NNN_mixed.png` (3 each, the first
  normal, the others with a defect, no masks); the mixed ones under another lighting.

The root holds the publisher's `license.txt` and `readme.txt`. Defects are MVTec AD 2's hard
kind: thin lines 1-3 px wide and spots of radius 2-6 px, each well under 1 % of the image.
Textures are smooth plus 8 x 8-block noise and PNGs use compression level 1, so the tree
(about 40 images) is written in a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.catalog import CATALOG
from datasets.synthetic import write_whole

NUM_TRAIN = 2
NUM_VALIDATION = 2
NUM_PUBLIC = 2  # per label: good/000..001 and bad/000..001
NUM_PRIVATE = 3  # per private split: 000 normal, 001 and 002 with a defect
PNG_LEVEL = 1  # zlib level: fast to write; the smooth images stay under 1 MB each
_BLOCK = 8  # side of the noise blocks


def _block_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Noise constant on 8 x 8 blocks (compresses well, still differs per image). -> [H, W]"""
    blocks = rng.normal(0, scale, (-(-height // _BLOCK), -(-width // _BLOCK))).astype(np.float32)
    return np.repeat(np.repeat(blocks, _BLOCK, axis=0), _BLOCK, axis=1)[:height, :width]


def _can(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Brushed metal: grey rows of random brightness, a horizontal highlight. -> [H, W, 3]"""
    rows = (120 + np.cumsum(rng.normal(0, 0.6, height))).astype(np.float32)
    cols = 25 * np.exp(-(((np.arange(width) - width * rng.uniform(0.3, 0.7)) / (width / 6)) ** 2))
    gray = _block_noise(rng, height, width, 3) + rows[:, None] + cols.astype(np.float32)
    return gray[..., None] + np.array([4, 2, 0], dtype=np.float32)


def _fabric(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Woven fabric: a blue weave of period 16 px at a random phase. -> [H, W, 3]"""
    phase_row, phase_col = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(np.arange(height) * np.pi / 8 + phase_row)[:, None] * np.sin(
        np.arange(width) * np.pi / 8 + phase_col
    )
    shade = (20 * weave).astype(np.float32) + _block_noise(rng, height, width, 2)
    return shade[..., None] + np.array([70, 90, 150], dtype=np.float32)


def _vial(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Back-lit vial: a bright vertical band on a dark background. -> [H, W]"""
    center = width * rng.uniform(0.45, 0.55)
    band = (30 + 170 * np.exp(-(((np.arange(width) - center) / (width / 5)) ** 4))).astype(
        np.float32
    )
    return band[None, :] + _block_noise(rng, height, width, 3)


# class -> (texture, (width, height)); the class names are the catalog's
CLASSES: dict[str, tuple[Callable[..., np.ndarray], tuple[int, int]]] = {
    "can": (_can, (2232, 1024)),
    "fabric": (_fabric, (1280, 1280)),
    "vial": (_vial, (1000, 1400)),
}
assert set(CLASSES) <= set(CATALOG["MVTecAD2"].classes)


def _thin_line(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A straight scratch 100-400 px long and 1-3 px wide, drawn in its bounding box only.
    -> [H, W] bool"""
    length = rng.uniform(100, 400)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])  # (row, col)
    center = rng.uniform([220, 220], [height - 220, width - 220])
    start, end = center - direction * length / 2, center + direction * length / 2
    half_width = rng.uniform(0.5, 1.5)
    top, left = np.floor(np.minimum(start, end) - 2).astype(int)
    bottom, right = np.ceil(np.maximum(start, end) + 3).astype(int)
    rows, cols = np.mgrid[top:bottom, left:right].astype(np.float32)
    d_row, d_col = rows - start[0], cols - start[1]
    along = np.clip(d_row * direction[0] + d_col * direction[1], 0, length)
    distance = np.hypot(d_row - along * direction[0], d_col - along * direction[1])
    region = np.zeros((height, width), dtype=bool)
    region[top:bottom, left:right] = distance <= half_width
    return region


def _spot(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A small round spot of radius 2-6 px. -> [H, W] bool"""
    radius = rng.uniform(2, 6)
    center_row, center_col = rng.uniform([20, 20], [height - 20, width - 20])
    top, left = int(center_row - radius) - 1, int(center_col - radius) - 1
    size = int(2 * radius) + 4
    rows, cols = np.mgrid[top : top + size, left : left + size]
    region = np.zeros((height, width), dtype=bool)
    region[top : top + size, left : left + size] = (
        np.hypot(rows - center_row, cols - center_col) <= radius
    )
    return region


def _paint_defect(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a thin line or a small spot (dark or bright) into `image` [H, W(, 3)] in place;
    -> the painted pixels [H, W] bool."""
    height, width = image.shape[:2]
    region = (_thin_line if rng.random() < 0.5 else _spot)(rng, height, width)
    image[region] = 15 if rng.random() < 0.5 else 245
    return region


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.clip(array, 0, 255) + 0.5).astype(np.uint8)  # rounded half up
    Image.fromarray(pixels).save(path, compress_level=PNG_LEVEL)


def _write_class(folder: Path, name: str, rng: np.random.Generator) -> None:
    texture, (width, height) = CLASSES[name]

    def draw() -> np.ndarray:
        return texture(rng, height, width)

    for index in range(NUM_TRAIN):
        _save(draw(), folder / "train" / "good" / f"{index:03d}.png")
    for index in range(NUM_VALIDATION):
        _save(draw(), folder / "validation" / "good" / f"{index:03d}.png")
    public = folder / "test_public"
    for index in range(NUM_PUBLIC):
        _save(draw(), public / "good" / f"{index:03d}.png")
        image = draw()
        region = _paint_defect(image, rng)
        _save(image, public / "bad" / f"{index:03d}.png")
        _save(region * 255.0, public / "ground_truth" / "bad" / f"{index:03d}_mask.png")
    for split, suffix in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        for index in range(NUM_PRIVATE):
            image = draw()
            if index > 0:
                _paint_defect(image, rng)
            if split == "test_private_mixed":
                image = np.float32(0.7) * image + 40  # another lighting: dimmer, lower contrast
            _save(image, folder / split / f"{index:03d}_{suffix}.png")


def generate(root: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the miniature tree to `root` (in a temporary folder, renamed when done); return it.
    An existing complete tree is kept unless `overwrite`."""

    def write(folder: Path, rng: np.random.Generator) -> None:
        (folder / "license.txt").write_text("CC BY-NC-SA 4.0 (miniature for tests)\n")
        (folder / "readme.txt").write_text("MVTec AD 2 layout, generated\n")
        for name in CLASSES:
            _write_class(folder / name, name, rng)

    return write_whole(root, "miniature MVTec AD 2 tree", write, seed, overwrite)
