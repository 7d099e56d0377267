"""Folders of field images for predict.py: listing and robust loading through the model's
preprocessing.

Each file is read by `datasets.preprocessing.read_image` and prepared by the predictor's
`Preprocessing` (the same object test.py's loader and the exported predictor use); an unreadable
file becomes an item with its error (`ImageItem.error`), never an exception, so one
corrupt file cannot stop a run.

Memory: each file is checked against the pixel budget (`max_pixels`, `--max_image_pixels`) on
its header; in whole-image mode an image of more than FULL_RESOLUTION_PIXELS is reduced before
its RGB conversion (`read_image`'s `reduce_above`), and the copy kept for overlays and
thumbnails (`original`) is at most PREVIEW_SIDE px on its long side, so no item holds a
full-size picture. Names: `file` is `printable` (utils/core/names.py), valid UTF-8 whatever the
file system holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datasets.items import ImageItem
from datasets.metadata import IMAGE_EXTENSIONS
from datasets.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, Geometry, Preprocessing, read_image
from utils.core.errors import DataError
from utils.core.names import printable

logger = logging.getLogger(__name__)

# The data set builders' extensions plus two common in the field; matched case-insensitively.
FIELD_EXTENSIONS = tuple(dict.fromkeys((*IMAGE_EXTENSIONS, ".tiff", ".webp")))
PREVIEW_SIDE = 2048  # the long side of the copy kept for overlays and thumbnails
# Whole-image mode converts at most this many pixels to RGB (48 MB); a larger image is reduced
# first, to at least a quarter of it: a long side of 2000+ px, several times any model input.
FULL_RESOLUTION_PIXELS = 16_000_000


def list_images(folder: Path | str) -> list[Path]:
    """Image files under `folder` (recursive, sorted, FIELD_EXTENSIONS in any case).

    Raises DataError when the folder is missing or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass a folder of images")
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in FIELD_EXTENSIONS
    )
    if not files:
        extensions = ", ".join(FIELD_EXTENSIONS)
        raise DataError(f"{folder} holds no images ({extensions}); check the folder")
    return files


def preview(image: Image.Image) -> Image.Image:
    """`image` at most PREVIEW_SIDE px on its long side (bilinear after an integer reduction);
    itself when smaller."""
    if max(image.size) <= PREVIEW_SIDE:
        return image
    scale = PREVIEW_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


class ImageFolder(Dataset):
    """Files of a folder -> `ImageItem`s (errors as items, never raised), prepared by
    `preprocessing` (the predictor's).

    `file` is the path relative to `root` in POSIX form, `printable` (the key of scores.csv
    and labels.csv). `native` (tiled inference): no input is prepared; the item holds the image
    as read (`original`) and a geometry that places a map at the image's own resolution.
    `max_pixels`: the pixel budget (`read_image`).
    """

    def __init__(
        self,
        root: Path | str,
        preprocessing: Preprocessing,
        keep_original: bool = False,
        files: list[Path] | None = None,
        native: bool = False,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.files = list_images(self.root) if files is None else files
        self.preprocessing = preprocessing
        self.keep_original = keep_original or native
        self.native = native
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def relative_name(self, index: int) -> str:
        return printable(self.files[index].relative_to(self.root).as_posix())

    def __getitem__(self, index: int) -> ImageItem:
        item = ImageItem(self.relative_name(index))
        try:
            rgb = read_image(
                self.files[index],
                self.preprocessing.pad_color,
                self.max_pixels,
                None if self.native else FULL_RESOLUTION_PIXELS,
            )
        except DataError as error:
            item.error = printable(str(error))
            return item
        if self.native:
            item.geometry = Geometry.native(*rgb.size)
            item.original = np.asarray(rgb, dtype=np.uint8)
            return item
        item.image, item.valid_mask, item.geometry = self.preprocessing(rgb)
        if self.keep_original:
            item.original = np.asarray(preview(rgb), dtype=np.uint8)
        return item
