"""Folders of field images: listing and robust loading through the model's preprocessing (spec
feclip.md §14.1; predict.py).

Each file is read by `datasets.preprocessing.read_image` and prepared by the predictor's
`Preprocessing` (the same object test.py's loader and the exported predictor use); an unreadable
file becomes an error string for that file (`FieldImage.error`), never an exception, so one
corrupt file cannot stop a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.metadata import IMAGE_EXTENSIONS
from datasets.preprocessing import Geometry, Preprocessing, read_image
from utils.core.errors import DataError

logger = logging.getLogger(__name__)

# The data set builders' extensions plus two common in the field; matched case-insensitively.
FIELD_EXTENSIONS = tuple(dict.fromkeys((*IMAGE_EXTENSIONS, ".tiff", ".webp")))


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


@dataclass
class FieldImage:
    """One loaded file: network input, valid mask, geometry, or the error that stopped it."""

    file: str
    image: torch.Tensor | None = None  # [3, S, S]
    valid_mask: torch.Tensor | None = None  # [S, S] bool
    geometry: Geometry | None = None
    original: np.ndarray | None = None  # [H, W, 3] uint8 when kept for overlays
    error: str = ""


class ImageFolder(Dataset):
    """Files of a folder -> FieldImage items (errors as items, never raised), prepared by
    `preprocessing` (the predictor's).

    `file` is the path relative to `root` in POSIX form (the key of scores.csv and labels.csv).
    `native` (tiled inference): no input is prepared; the item holds the image as read
    (`original`) and a geometry that places a map at the image's own resolution.
    """

    def __init__(
        self,
        root: Path | str,
        preprocessing: Preprocessing,
        keep_original: bool = False,
        files: list[Path] | None = None,
        native: bool = False,
    ) -> None:
        self.root = Path(root)
        self.files = list_images(self.root) if files is None else files
        self.preprocessing = preprocessing
        self.keep_original = keep_original or native
        self.native = native

    def __len__(self) -> int:
        return len(self.files)

    def relative_name(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> FieldImage:
        item = FieldImage(self.relative_name(index))
        try:
            rgb = read_image(self.files[index], self.preprocessing.pad_color)
        except DataError as error:
            item.error = str(error)
            return item
        if self.native:
            item.geometry = Geometry.native(*rgb.size)
        else:
            item.image, item.valid_mask, item.geometry = self.preprocessing(rgb)
        if self.keep_original:
            item.original = np.asarray(rgb, dtype=np.uint8)
        return item


def collate(items: list[FieldImage]) -> list[FieldImage]:
    """DataLoader collate: keep the list (images of different sizes, errors)."""
    return items
