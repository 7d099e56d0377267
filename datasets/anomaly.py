"""Records to tensors: AA-CLIP's training set and per-class test sets (spec aaclip.md §12.4-12.5),
through the model's one `datasets.preprocessing.Preprocessing`.

An item is a dict: `image` [3, S, S] (normalised), `mask` [1, S, S] in {0, 1}, `valid_mask`
[S, S] bool (False on letterbox padding), `label` (int64 scalar), `file_name` (the record's
relative path) and `class_name`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from datasets.preprocessing import Preprocessing, read_image

logger = logging.getLogger(__name__)

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


def joint_augment(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation/translation/flips applied alike to image [3, S, S] and mask [1, S, S].

    Uses torch's global RNG (a DataLoader seeds it per worker).
    """
    stacked = _JOINT_AUGMENT(torch.cat([image, mask], dim=0))  # [4, S, S]
    return stacked[:3], stacked[3:]


class _RecordDataset(Dataset):
    """Shared loading of one record into the item dict."""

    def __init__(self, records: list[dict], root: Path | str, preprocessing: Preprocessing) -> None:
        self.records = records
        self.root = Path(root)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int, jitter: bool) -> dict:
        record = self.records[index]
        image = read_image(self.root / record["image_path"], self.preprocessing.pad_color)
        mask_path = record.get("mask_path") or ""
        mask = self.preprocessing.load_mask(
            self.root / mask_path if mask_path else None, image.size
        )
        if jitter:
            image = _COLOR_JITTER(image)
        prepared = self.preprocessing(image)
        return {
            "image": prepared.image,
            "mask": mask,
            "valid_mask": prepared.valid_mask,
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
        preprocessing: Preprocessing,
        color_jitter: bool = True,
        augment: bool = True,
    ) -> None:
        super().__init__(records, root, preprocessing)
        self.color_jitter = color_jitter
        self.augment = augment

    def __getitem__(self, index: int) -> dict:
        item = self._load(index, jitter=self.augment and self.color_jitter)
        del item["valid_mask"]  # training uses no padding mask (augmentation would move it)
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
    records: list[dict], root: Path | str, preprocessing: Preprocessing
) -> dict[str, TestDataset]:
    """One `TestDataset` per class, in the records' first-appearance order."""
    by_class: dict[str, list[dict]] = {}
    for record in records:
        by_class.setdefault(record["class_name"], []).append(record)
    return {
        name: TestDataset(class_records, root, preprocessing)
        for name, class_records in by_class.items()
    }
