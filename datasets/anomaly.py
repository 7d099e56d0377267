"""Records to tensors: AA-CLIP's training set and per-class test sets (its `dataset/__init__.py`,
`BaseDataset` and `BaseSingleClassDataset`), through the model's one
`datasets.preprocessing.Preprocessing`.

A training item is a dict: `image` [3, S, S] (normalised), `mask` [1, S, S] in {0, 1}, `label`
(int64 scalar), `mask_known` (bool scalar: False for an anomalous image without a mask, whose
defect pixels nobody marked; a normal image's all-zero mask is known), `file_name` (the record's
relative path) and `class_name`. A test item is a `datasets.items.ImageItem` (the prediction
stream's one item type) with the same image, mask, valid mask, label and class.

At native resolution (`datasets.tiling`): a training set with `tile` S takes the same random
S x S crop of an image and of its mask (one holding a defect pixel when the mask has any), then
prepares the crop as a whole image; a `native` test set hands the image as read (`original`,
`[H, W, 3]` uint8) and its mask `[1, H, W]` bool at the image's resolution.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from datasets.items import ImageItem
from datasets.preprocessing import Geometry, Preprocessing, read_image
from datasets.tiling import random_crop

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
# black: an AA-CLIP quirk kept on purpose (`BaseDataset` in its `dataset/__init__.py`). Nearest
# keeps the mask binary.
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

    def _load(self, index: int, jitter: bool, tile: int = 0) -> dict:
        record = self.records[index]
        image = read_image(self.root / record["image_path"], self.preprocessing.pad_color)
        mask_path = record.get("mask_path") or ""
        mask_file = self.root / mask_path if mask_path else None
        if tile:  # --train_tile: one random crop of image and mask at native resolution
            native_mask = self.preprocessing.load_native_mask(mask_file, image.size)
            image, native_mask = random_crop(image, native_mask, tile, self.preprocessing.pad_color)
            mask = self.preprocessing.mask(native_mask, image.size)
        else:
            mask = self.preprocessing.load_mask(mask_file, image.size)
        if jitter:
            image = _COLOR_JITTER(image)
        prepared = self.preprocessing(image)
        return {
            "image": prepared.image,
            "mask": mask,
            "valid_mask": prepared.valid_mask,
            "label": torch.tensor(int(record["label"]), dtype=torch.int64),
            "mask_known": torch.tensor(bool(mask_path) or int(record["label"]) == 0),
            "file_name": record["image_path"],
            "class_name": record["class_name"],
        }


class TrainDataset(_RecordDataset):
    """The training set: with `augment`, joint geometric augmentation and, with `color_jitter`,
    colour jitter first (AA-CLIP stage 2 and the single-stage models; stage 1 has none).
    `pixel_loss` False marks every mask unknown: image labels alone train. `tile` S > 0: a
    random S x S crop at native resolution instead of the whole image (`--train_tile`)."""

    def __init__(
        self,
        records: list[dict],
        root: Path | str,
        preprocessing: Preprocessing,
        color_jitter: bool = True,
        augment: bool = True,
        pixel_loss: bool = True,
        tile: int = 0,
    ) -> None:
        super().__init__(records, root, preprocessing)
        self.color_jitter = color_jitter
        self.augment = augment
        self.pixel_loss = pixel_loss
        self.tile = tile

    def __getitem__(self, index: int) -> dict:
        item = self._load(index, jitter=self.augment and self.color_jitter, tile=self.tile)
        if not self.pixel_loss:
            item["mask_known"] = torch.tensor(False)
        del item["valid_mask"]  # training uses no padding mask (augmentation would move it)
        if self.augment:
            item["image"], item["mask"] = joint_augment(item["image"], item["mask"])
        return item


class TestDataset(_RecordDataset):
    """One class's test images, no augmentation, as `ImageItem`s (`file`: the record's relative
    path; `path`: absolute). `native`: the image as read (`original`) and its mask at its own
    resolution (tiled inference, maps at native resolution)."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        records: list[dict],
        root: Path | str,
        preprocessing: Preprocessing,
        native: bool = False,
    ) -> None:
        super().__init__(records, root, preprocessing)
        self.native = native

    def __getitem__(self, index: int) -> ImageItem:
        record = self.records[index]
        path = os.path.abspath(self.root / record["image_path"])
        label = int(record["label"])
        if not self.native:
            item = self._load(index, jitter=False)
            return ImageItem(
                record["image_path"],
                image=item["image"],
                valid_mask=item["valid_mask"],
                mask=item["mask"],
                label=label,
                class_name=record["class_name"],
                path=path,
            )
        image = read_image(self.root / record["image_path"], self.preprocessing.pad_color)
        mask_path = record.get("mask_path") or ""
        mask = self.preprocessing.load_native_mask(
            self.root / mask_path if mask_path else None, image.size
        )
        defect = np.zeros((image.height, image.width), bool) if mask is None else np.asarray(mask)
        return ImageItem(
            record["image_path"],
            original=np.asarray(image, dtype=np.uint8),
            geometry=Geometry.native(*image.size),
            mask=torch.from_numpy(defect > 0)[None],  # [1, H, W]
            label=label,
            class_name=record["class_name"],
            path=path,
        )


def build_test_datasets(
    records: list[dict], root: Path | str, preprocessing: Preprocessing, native: bool = False
) -> dict[str, TestDataset]:
    """One `TestDataset` per class, in the records' first-appearance order (`native`: images
    and masks at their own resolution, for tiled inference)."""
    by_class: dict[str, list[dict]] = {}
    for record in records:
        by_class.setdefault(record["class_name"], []).append(record)
    return {
        name: TestDataset(class_records, root, preprocessing, native)
        for name, class_records in by_class.items()
    }
