"""The one item every inference reader yields, and its batches: a labelled record
(`datasets.anomaly.TestDataset`) and a field folder's file (`datasets.folder.ImageFolder`) alike,
so one per-image stream (`utils.inference.stream.predict_images`) serves test.py, calibrate,
score and export.

At the model input an item holds its prepared image `[3, S, S]` and valid mask `[S, S]`; at
native resolution (tiles, or a map resized back to the image) it holds the image as read
(`original`, `[H, W, 3]` uint8), which the predictor prepares itself. A file that could not be
read is an item with `error` set and nothing else: a row of its own, never a stopped run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from datasets.preprocessing import Geometry


@dataclasses.dataclass
class ImageItem:
    """One image as a reader hands it to the prediction stream."""

    file: str  # its name in results: a record's image_path, or a folder file's relative path
    image: torch.Tensor | None = None  # [3, S, S] float32, normalised (model-input readers)
    valid_mask: torch.Tensor | None = None  # [S, S] bool, False on letterbox padding
    original: np.ndarray | None = None  # [H, W, 3] uint8: the image as read (native readers),
    # or a preview of it kept for pictures (field folders)
    geometry: Geometry | None = None  # where the image lands on the input (or Geometry.native)
    error: str = ""  # why the file could not be read ("" when it was)
    # labelled records only
    mask: torch.Tensor | None = None  # [1, S, S] float {0, 1}, or [1, H, W] bool when native
    label: int | None = None
    class_name: str | None = None
    path: str | None = None  # the image file's absolute path

    def picture_geometry(self) -> Geometry:
        """`geometry` for `original`, which may be a reduced copy of the image read."""
        height, width = self.original.shape[:2]
        if (height, width) == (self.geometry.height, self.geometry.width):
            return self.geometry
        return self.geometry.resized(width, height)


@dataclasses.dataclass
class ItemBatch:
    """Items of one loader batch; the readable model-input items' images stacked once.

    `images` `[b, 3, S, S]` and `valid_mask` `[b, S, S]` hold the `b` items without an error that
    carry a prepared image, in order (None when none does: native readers, or all unreadable);
    the items then drop their own copy."""

    items: list[ImageItem]
    images: torch.Tensor | None = None
    valid_mask: torch.Tensor | None = None

    def pin_memory(self) -> ItemBatch:
        """The DataLoader's `pin_memory=True` (CUDA): the stacked tensors in pinned memory."""
        if self.images is None:
            return self
        return ItemBatch(self.items, self.images.pin_memory(), self.valid_mask.pin_memory())


def collate_items(items: Sequence[ImageItem]) -> ItemBatch:
    """DataLoader collate: stack the prepared images of the readable items (sizes differ only
    at native resolution, where nothing is stacked)."""
    prepared = [item for item in items if not item.error and item.image is not None]
    if not prepared:
        return ItemBatch(list(items))
    images = torch.stack([item.image for item in prepared])
    valid_mask = torch.stack([item.valid_mask for item in prepared])
    for item in prepared:
        item.image = item.valid_mask = None
    return ItemBatch(list(items), images, valid_mask)
