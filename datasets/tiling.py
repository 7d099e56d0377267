"""Tiles of high-resolution images: the tiled-inference settings, the tile grid, the blend window,
the stitcher that blends tile maps into one full-resolution map, and the random crops of
training at native resolution. No model here: `utils.inference.resolution.TiledPredictor` runs
the tiles through a predictor.

Grid (`tile_starts`): the image, resized by `tile_scale` (bicubic; 1 = native), is covered by
S x S tiles. Along a side of length L they start every `stride = max(1, round(S * (1 -
overlap)))` pixels from 0 and the last one is aligned to the edge (it starts at L - S), so every
pixel is covered and no tile leaves the image. A side shorter than S gets one tile, the image
centred in it letterbox-style: the rest is the pad colour (never an upscale), False in the
tile's valid mask, and never scored. Each tile reaches the model through the model's one
`Preprocessing` (resized to its input side when S differs; a square crop lands the same way
under every geometry).

Blend (`tile_window`, `Stitcher`): each tile's map m_t (at S x S) is weighted by the separable
window w(y, x) = v(y) v(x), v(i) = max(WINDOW_FLOOR, 1 - |2 (i + 0.5) / S - 1|), a triangle over
the pixel centres, near 1 in the middle and falling towards the tile's edges; the floor keeps
weight at image borders, where the edge of a tile is all there is. The stitched map is

    M(p) = sum_t w_t(p) m_t(p) / sum_t w_t(p)

over the tiles t whose image part holds p: a constant map stays constant (no seams), a pixel
seen by one tile takes its value, and where tiles overlap the one whose centre is nearer (whose
prediction had more context around p) weighs more. With `tile_scale` != 1 the stitched map is
resized back (bilinear) to the image's native resolution.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.preprocessing import Preprocessing
from utils.core.config import RUN, setting

WINDOW_FLOOR = 0.01


@dataclasses.dataclass
class TileConfig:
    """Tiled inference at native resolution (test.py; predict.py calibrate, score, and export:
    its k-shot memory and in-folder calibration)."""

    tile: int = setting(
        0,
        "tiled inference: cover each image with S x S crops at native resolution, each resized "
        "to the model input when S differs, and blend their maps into a full-resolution map "
        "(0: off, the whole image resized to the input)",
        kind=RUN,
        minimum=0,
    )
    tile_overlap: float = setting(
        0.25,
        "with --tile: the fraction of a tile its neighbour shares",
        kind=RUN,
        minimum=0,
        maximum=0.9,
    )
    tile_scale: float = setting(
        1.0,
        "with --tile: resize each image by this factor (bicubic) before tiling (1: native)",
        kind=RUN,
        above=0,
    )

    def tiling(self) -> dict[str, Any] | None:
        """The tiling a calibration or results file records (None: whole images)."""
        if not self.tile:
            return None
        return {"tile": self.tile, "overlap": self.tile_overlap, "scale": self.tile_scale}


def is_tiling(value: Any) -> bool:
    """Whether a record's value has the shape of `TileConfig.tiling()` (not None)."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("tile"), int)
        and not isinstance(value.get("tile"), bool)
        and all(
            isinstance(value.get(key), (int, float))
            and not isinstance(value.get(key), bool)
            and math.isfinite(value[key])
            for key in ("overlap", "scale")
        )
    )


# ---------------------------------------------------------------------------------------------
# Grid and window


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Where the tiles of side `size` start along a side of `length` pixels: every stride from
    0, the last at the edge; one centred tile (a negative start) when the side is shorter."""
    if length <= size:
        return [-((size - length) // 2)]
    stride = max(1, round(size * (1 - overlap)))
    starts = list(range(0, length - size, stride))
    return [*starts, length - size]


def tile_grid(height: int, width: int, size: int, overlap: float) -> list[tuple[int, int]]:
    """Every tile's (top, left) on an image of `height` x `width`, row by row."""
    columns = tile_starts(width, size, overlap)
    return [(top, left) for top in tile_starts(height, size, overlap) for left in columns]


def tile_window(size: int, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """The blend window `[S, S]` float32: v(y) v(x) with
    v(i) = max(floor, 1 - |2 (i + 0.5) / S - 1|)."""
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size
    profile = np.maximum(floor, 1.0 - np.abs(2.0 * centres - 1.0))
    return np.outer(profile, profile).astype(np.float32)


def _overlap(start: int, size: int, length: int) -> tuple[int, int]:
    """The image span [first, stop) a tile starting at `start` covers on a side of `length`."""
    return max(start, 0), min(start + size, length)


def crop_tile(
    image: Image.Image, top: int, left: int, size: int, fill: int | tuple[int, ...]
) -> Image.Image:
    """The `size` x `size` crop of `image` at (top, left); what lies outside the image is
    `fill` (a start may be negative: the image is centred in the tile)."""
    width, height = image.size
    (row, stop_row), (col, stop_col) = _overlap(top, size, height), _overlap(left, size, width)
    crop = image.crop((col, row, stop_col, stop_row))
    if crop.size == (size, size):
        return crop
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(crop, (col - left, row - top))
    return canvas


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) of an image resized by `scale` (at least one pixel each)."""
    return max(1, round(width * scale)), max(1, round(height * scale))


# ---------------------------------------------------------------------------------------------
# Stitching


class Stitcher:
    """Blends tile maps into one `[H, W]` map (the module docstring's formula), holding exactly
    two full-resolution float32 buffers: the weighted sum and the summed weights."""

    def __init__(self, height: int, width: int, size: int, floor: float = WINDOW_FLOOR) -> None:
        self.size = size
        self.window = tile_window(size, floor)  # [S, S]
        self.total = np.zeros((height, width), np.float32)  # sum_t w_t m_t
        self.weight = np.zeros((height, width), np.float32)  # sum_t w_t

    def buffers(self) -> list[np.ndarray]:
        """The full-resolution arrays held now (two until `result`, then one)."""
        return [array for array in (self.total, self.weight) if array is not None]

    def add(self, tile_map: np.ndarray, top: int, left: int) -> None:
        """Blend one tile's map `[S, S]` whose tile starts at (top, left); its part outside the
        image (padding) is left out."""
        height, width = self.total.shape
        (row, stop_row), (col, stop_col) = (
            _overlap(top, self.size, height),
            _overlap(left, self.size, width),
        )
        rows = slice(row - top, stop_row - top)
        cols = slice(col - left, stop_col - left)
        window = self.window[rows, cols]
        self.total[row:stop_row, col:stop_col] += window * tile_map[rows, cols]
        self.weight[row:stop_row, col:stop_col] += window

    def result(self) -> np.ndarray:
        """The stitched map `[H, W]` float32, divided in place (the weights are then released)."""
        assert self.weight.min() > 0, "a pixel no tile covered"
        np.divide(self.total, self.weight, out=self.total)
        self.weight = None
        return self.total


# ---------------------------------------------------------------------------------------------
# Tiles through the preprocessing


class TileBatch(NamedTuple):
    """Tiles of one image as the model takes them."""

    images: torch.Tensor  # [b, 3, S_in, S_in] float32, normalised
    valid_mask: torch.Tensor  # [b, S_in, S_in] bool, False on padding
    positions: list[tuple[int, int]]  # each tile's (top, left) on the (scaled) image


class Tiler:
    """Cuts images into the tiles `config` (a `TileConfig`) describes and prepares each with
    `preprocessing` (the predictor's: input side S_in, normalisation, pad colour)."""

    def __init__(self, preprocessing: Preprocessing, config: TileConfig) -> None:
        self.preprocessing = preprocessing
        self.size = config.tile
        self.overlap = config.tile_overlap
        self.scale = config.tile_scale

    def scaled(self, image: Image.Image) -> Image.Image:
        """The image resized by `tile_scale` (itself at 1)."""
        size = scaled_size(*image.size, self.scale)
        if size == image.size:
            return image
        return image.resize(size, Image.Resampling.BICUBIC)

    def positions(self, image: Image.Image) -> list[tuple[int, int]]:
        """Every tile's (top, left) on an image already `scaled`."""
        return tile_grid(image.height, image.width, self.size, self.overlap)

    def valid_mask(self, image: Image.Image, top: int, left: int) -> torch.Tensor:
        """`[S_in, S_in]` bool: True where the tile at (top, left) shows the image."""
        side, ratio = self.preprocessing.size, self.preprocessing.size / self.size
        (row, stop_row), (col, stop_col) = (
            _overlap(top, self.size, image.height),
            _overlap(left, self.size, image.width),
        )
        mask = torch.zeros(side, side, dtype=torch.bool)
        mask[
            round((row - top) * ratio) : round((stop_row - top) * ratio),
            round((col - left) * ratio) : round((stop_col - left) * ratio),
        ] = True
        return mask

    def batches(self, image: Image.Image, batch_size: int) -> Iterator[TileBatch]:
        """The tiles of an image already `scaled`, `batch_size` at a time (only one batch of
        tiles is held)."""
        positions = self.positions(image)
        for start in range(0, len(positions), batch_size):
            yield self.batch(image, positions[start : start + batch_size])

    def batch(self, image: Image.Image, positions: list[tuple[int, int]]) -> TileBatch:
        """The tiles at `positions` (top, left) of an image already `scaled`, prepared."""
        fill = self.preprocessing.pad_color
        tiles = [
            self.preprocessing(crop_tile(image, top, left, self.size, fill)).image
            for top, left in positions
        ]
        valid = [self.valid_mask(image, top, left) for top, left in positions]
        return TileBatch(torch.stack(tiles), torch.stack(valid), positions)

    def tiles(self, image: Image.Image) -> torch.Tensor:
        """Every tile of an image (scaled here): `[T, 3, S_in, S_in]` (support sets)."""
        scaled = self.scaled(image)
        (batch,) = self.batches(scaled, len(self.positions(scaled)))
        return batch.images

    def to_tile(self, maps: torch.Tensor) -> np.ndarray:
        """Tile maps at the model input `[b, S_in, S_in]` -> at the tile side `[b, S, S]`
        float32 (bilinear, as `Geometry.to_original`)."""
        maps = maps.float()
        if maps.shape[-1] != self.size:
            maps = F.interpolate(
                maps[:, None], size=(self.size, self.size), mode="bilinear", align_corners=False
            )[:, 0]
        return maps.cpu().numpy()


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map `[h, w]` resized bilinearly to `[height, width]` float32."""
    resized = F.interpolate(
        torch.from_numpy(anomaly_map)[None, None],
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    return resized[0, 0].numpy()


# ---------------------------------------------------------------------------------------------
# Training crops


def random_crop(
    image: Image.Image, mask: Image.Image | None, size: int, fill: tuple[int, int, int]
) -> tuple[Image.Image, Image.Image | None]:
    """The same random `size` x `size` crop of an image and of its mask (L, at the image's
    resolution, or None), drawn with torch's global RNG (a DataLoader seeds it per worker).
    When the mask has defect pixels the crop holds one, drawn at random, so a crop of an
    anomalous image stays anomalous; a side shorter than `size` is centred and padded with
    `fill` (the mask with 0), as tiles are."""
    defects = None if mask is None else np.argwhere(np.asarray(mask) > 0)  # [n, 2] row, col
    points: list[int | None] = [None, None]
    if defects is not None and len(defects):
        points = defects[torch.randint(len(defects), (1,)).item()].tolist()
    origin = []
    for length, point in zip((image.height, image.width), points, strict=True):
        if length <= size:
            origin.append(-((size - length) // 2))
            continue
        low, high = 0, length - size
        if point is not None:
            low, high = max(low, point - size + 1), min(high, point)
        origin.append(int(torch.randint(low, high + 1, (1,)).item()))
    top, left = origin
    crop = crop_tile(image, top, left, size, fill)
    return crop, None if mask is None else crop_tile(mask, top, left, size, 0)
