"""Records to tensors: AA-CLIP's training set and per-class test sets (spec aaclip.md §12.4-12.5).

An item is a dict: `image` [3, S, S] (CLIP-normalised), `mask` [1, S, S] in {0, 1}, `label`
(int64 scalar), `file_name` (the record's relative path) and `class_name`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from utils.core.errors import DataError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Stage 2 only, on the PIL image before resizing: three independent jitters, in this order.
_COLOR_JITTER = transforms.Compose(
    [
        transforms.RandomApply([transforms.ColorJitter(brightness=0.5)], p=0.7),
        transforms.RandomApply([transforms.ColorJitter(contrast=0.5)], p=0.7),
        transforms.RandomApply([transforms.ColorJitter(saturation=0.5)], p=0.7),
    ]
)
# Both stages, on [image, mask] stacked; torchvision defaults: nearest interpolation, fill 0.
# Fill 0 lands after normalisation, so uncovered corners get CLIP's mean colour rather than
# black: an AA-CLIP quirk kept on purpose (spec §17.14). Nearest keeps the mask binary.
_JOINT_AUGMENT = transforms.Compose(
    [
        transforms.RandomApply([transforms.RandomRotation(30)], p=0.5),
        transforms.RandomApply([transforms.RandomAffine(degrees=0, translate=(0.15, 0.15))], p=0.5),
        transforms.RandomHorizontalFlip(0.5),
        transforms.RandomVerticalFlip(0.5),
    ]
)


def _open_rgb(path: Path | str) -> Image.Image:
    """Decode an image as RGB; an RGB file is returned as decoded (`convert` would copy it: a
    third of the decoding time of a 900 px PNG)."""
    try:
        with Image.open(path) as image:
            if image.mode == "RGB":
                image.load()
                return image
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read image {path}: {error}; remove or replace the file") from error


RESIZE_MODES = ("square", "short_side_crop")
MASK_RESIZES = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocessing:
    """How an image and its mask become model inputs (each model's original's recipe).

    resize: `square` (bicubic to S x S, aspect not kept: AA-CLIP, SOWA) or `short_side_crop`
        (bicubic short side to S, then the centre S x S: CLIP's own, the FE-CLIP fork's).
    mask_resize: `nearest` (AA-CLIP) or `bilinear` (SOWA: grey values at the edges).
    mask_threshold: a pixel is defect where the resized mask, in [0, 1], is above it (AA-CLIP 0,
        i.e. any non-zero pixel; SOWA 0 for training and 0.5 for testing).
    resize_masks: a mask whose size differs from its image is resized to the input like the
        image, as the original code does without a check (`--resize_masks`); off, it is an error.
    """

    resize: str = "square"
    mask_resize: str = "nearest"
    mask_threshold: float = 0.0
    resize_masks: bool = False  # a mask of another size than its image: resize, not refuse


def resize_image(image: Image.Image, img_size: int, mode: str = "square") -> Image.Image:
    """A PIL image at the model's input geometry (`Preprocessing.resize`), bicubic."""
    return _resize(image, img_size, mode, Image.Resampling.BICUBIC)


def seen_region(image: Image.Image, mode: str = "square") -> Image.Image:
    """The part of an image the model sees, at the image's own resolution: all of it, or the
    centred square of its short side for `short_side_crop`."""
    if mode != "short_side_crop":
        return image
    side = min(image.size)
    return transforms.functional.center_crop(image, [side, side])


def _resize(image: Image.Image, size: int, mode: str, resample: Image.Resampling) -> Image.Image:
    if mode == "square":
        return image.resize((size, size), resample)
    if mode != "short_side_crop":
        raise ValueError(f"unknown resize mode {mode!r}; use one of {RESIZE_MODES}")
    short = transforms.functional.resize(image, size, interpolation=_INTERPOLATION[resample])
    return transforms.functional.center_crop(short, [size, size])


_INTERPOLATION = {
    Image.Resampling.BICUBIC: transforms.InterpolationMode.BICUBIC,
    Image.Resampling.BILINEAR: transforms.InterpolationMode.BILINEAR,
    Image.Resampling.NEAREST: transforms.InterpolationMode.NEAREST,
}


def _image_to_tensor(image: Image.Image, img_size: int, mode: str = "square") -> torch.Tensor:
    """PIL RGB -> [3, S, S]: `resize_image`, then CLIP normalisation."""
    return transforms.functional.normalize(
        transforms.functional.to_tensor(resize_image(image, img_size, mode)), CLIP_MEAN, CLIP_STD
    )


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """CLIP-normalised images `[B, 3, S, S]` back to the resized 8-bit pixels `[B, S, S, 3]`
    they were made from (exact: the rounding error is far below half a grey level)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = ((images.detach().cpu().float() * std + mean) * 255).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_image(path: Path | str, img_size: int, mode: str = "square") -> torch.Tensor:
    """Read an image (grayscale becomes RGB) -> [3, S, S] normalised with CLIP's mean/std."""
    return _image_to_tensor(_open_rgb(path), img_size, mode)


def load_mask(
    path: Path | str | None,
    img_size: int,
    image_size_wh: tuple[int, int],
    preprocessing: Preprocessing | None = None,
) -> torch.Tensor:
    """Read a mask -> [1, S, S] float in {0, 1}; None -> zeros.

    The mask is made binary first (any non-zero pixel is defect, as every original does), then
    resized as `preprocessing` says and thresholded. `image_size_wh` is the original (width,
    height) of the mask's image; they must agree.
    """
    if not path:
        return torch.zeros(1, img_size, img_size)
    try:
        with Image.open(path) as mask_file:
            mask = mask_file.convert("L")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read mask {path}: {error}; remove or replace the file") from error
    preprocessing = preprocessing or Preprocessing()
    if mask.size != tuple(image_size_wh) and not preprocessing.resize_masks:
        raise DataError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is "
            f"{image_size_wh[0]}x{image_size_wh[1]}; masks must match their image: fix it, or "
            "pass --resize_masks to resize it to the input as the original code does"
        )
    binary = mask.point(lambda value: 255 if value else 0)
    resample = MASK_RESIZES[preprocessing.mask_resize]
    resized = _resize(binary, img_size, preprocessing.resize, resample)
    return (transforms.functional.to_tensor(resized) > preprocessing.mask_threshold).float()


def joint_augment(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation/translation/flips applied alike to image [3, S, S] and mask [1, S, S].

    Uses torch's global RNG (a DataLoader seeds it per worker).
    """
    stacked = _JOINT_AUGMENT(torch.cat([image, mask], dim=0))  # [4, S, S]
    return stacked[:3], stacked[3:]


class _RecordDataset(Dataset):
    """Shared loading of one record into the item dict."""

    def __init__(
        self,
        records: list[dict],
        root: Path | str,
        img_size: int,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        self.records = records
        self.root = Path(root)
        self.img_size = img_size
        self.preprocessing = preprocessing or Preprocessing()

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int, jitter: bool) -> dict:
        record = self.records[index]
        pil_image = _open_rgb(self.root / record["image_path"])
        mask_path = record.get("mask_path") or ""
        mask = load_mask(
            self.root / mask_path if mask_path else None,
            self.img_size,
            pil_image.size,
            self.preprocessing,
        )
        if jitter:
            pil_image = _COLOR_JITTER(pil_image)
        return {
            "image": _image_to_tensor(pil_image, self.img_size, self.preprocessing.resize),
            "mask": mask,
            "label": torch.tensor(int(record["label"]), dtype=torch.int64),
            "file_name": record["image_path"],
            "class_name": record["class_name"],
        }


class TrainDataset(_RecordDataset):
    """The training set: with `augment`, joint geometric augmentation and, with `color_jitter`,
    colour jitter first (AA-CLIP stage 2 and the single-stage models; stage 1 has none)."""

    def __init__(
        self,
        records: list[dict],
        root: Path | str,
        img_size: int,
        color_jitter: bool = True,
        augment: bool = True,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        super().__init__(records, root, img_size, preprocessing)
        self.color_jitter = color_jitter
        self.augment = augment

    def __getitem__(self, index: int) -> dict:
        item = self._load(index, jitter=self.augment and self.color_jitter)
        if self.augment:
            item["image"], item["mask"] = joint_augment(item["image"], item["mask"])
        return item


class TestDataset(_RecordDataset):
    """One class's test images, no augmentation; items add `image_path` (absolute)."""

    __test__ = False  # not a pytest test class despite the name

    def __getitem__(self, index: int) -> dict:
        item = self._load(index, jitter=False)
        item["image_path"] = os.path.abspath(self.root / self.records[index]["image_path"])
        return item


def build_test_datasets(
    records: list[dict],
    root: Path | str,
    img_size: int,
    preprocessing: Preprocessing | None = None,
) -> dict[str, TestDataset]:
    """One `TestDataset` per class, in the records' first-appearance order."""
    by_class: dict[str, list[dict]] = {}
    for record in records:
        by_class.setdefault(record["class_name"], []).append(record)
    return {
        name: TestDataset(class_records, root, img_size, preprocessing)
        for name, class_records in by_class.items()
    }
