"""Records to tensors: AA-CLIP's training set and per-class test sets (spec aaclip.md §12.4-12.5).

An item is a dict: `image` [3, S, S] (CLIP-normalised), `mask` [1, S, S] in {0, 1}, `label`
(int64 scalar), `file_name` (the record's relative path) and `class_name`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from utils.errors import DataError

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
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read image {path}: {error}; remove or replace the file") from error


def _image_to_tensor(image: Image.Image, img_size: int) -> torch.Tensor:
    """PIL RGB -> [3, S, S]: bicubic resize to S x S (aspect not kept), CLIP normalisation."""
    resized = image.resize((img_size, img_size), Image.Resampling.BICUBIC)
    return transforms.functional.normalize(
        transforms.functional.to_tensor(resized), CLIP_MEAN, CLIP_STD
    )


def load_image(path: Path | str, img_size: int) -> torch.Tensor:
    """Read an image (grayscale becomes RGB) -> [3, S, S] normalised with CLIP's mean/std."""
    return _image_to_tensor(_open_rgb(path), img_size)


def load_mask(
    path: Path | str | None, img_size: int, image_size_wh: tuple[int, int]
) -> torch.Tensor:
    """Read a mask -> [1, S, S] float in {0, 1} (any non-zero pixel is defect); None -> zeros.

    `image_size_wh` is the original (width, height) of the mask's image; they must agree.
    """
    if not path:
        return torch.zeros(1, img_size, img_size)
    try:
        with Image.open(path) as mask_file:
            mask = mask_file.convert("L")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read mask {path}: {error}; remove or replace the file") from error
    if mask.size != tuple(image_size_wh):
        raise DataError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is "
            f"{image_size_wh[0]}x{image_size_wh[1]}; masks must match their image"
        )
    resized = mask.resize((img_size, img_size), Image.Resampling.NEAREST)
    return (transforms.functional.to_tensor(resized) != 0).float()


def joint_augment(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation/translation/flips applied alike to image [3, S, S] and mask [1, S, S].

    Uses torch's global RNG (a DataLoader seeds it per worker).
    """
    stacked = _JOINT_AUGMENT(torch.cat([image, mask], dim=0))  # [4, S, S]
    return stacked[:3], stacked[3:]


class _RecordDataset(Dataset):
    """Shared loading of one record into the item dict."""

    def __init__(self, records: list[dict], root: Path | str, img_size: int) -> None:
        self.records = records
        self.root = Path(root)
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int, jitter: bool) -> dict:
        record = self.records[index]
        pil_image = _open_rgb(self.root / record["image_path"])
        mask_path = record.get("mask_path") or ""
        mask = load_mask(
            self.root / mask_path if mask_path else None, self.img_size, pil_image.size
        )
        if jitter:
            pil_image = _COLOR_JITTER(pil_image)
        return {
            "image": _image_to_tensor(pil_image, self.img_size),
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
    ) -> None:
        super().__init__(records, root, img_size)
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
    records: list[dict], root: Path | str, img_size: int
) -> dict[str, TestDataset]:
    """One `TestDataset` per class, in the records' first-appearance order."""
    by_class: dict[str, list[dict]] = {}
    for record in records:
        by_class.setdefault(record["class_name"], []).append(record)
    return {
        name: TestDataset(class_records, root, img_size) for name, class_records in by_class.items()
    }
