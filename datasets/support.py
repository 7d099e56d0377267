"""k-shot support sets: normal images of a class from the TRAIN split of a test data set.

SOWA's `KShotDataset` (`src/data/components/kshot_dataset.py`) reads meta.json "train" of the
test root: for MVTec, MPDD, MVTec AD 2 and the synthetic set that is `<class>/train/good/*`, for
VisA the `split_csv/1cls.csv` rows with split train and label normal, for BTAD `<class>/train/ok/*`.
The original draws `random.sample(items, k)` without a seed (its `src/eval.py` never seeds); here
candidates are sorted and drawn with `random.Random(seed)`, so a seed names the support set.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import torch

from datasets.catalog import DatasetInfo, get_dataset_info
from datasets.metadata import IMAGE_EXTENSIONS, dagm_defective
from datasets.preprocessing import Preprocessing
from utils.core.errors import DataError

logger = logging.getLogger(__name__)

NORMAL_TRAIN_FOLDERS = {"mvtec": "good", "btad": "ok", "mvtec_ad2": "good"}


def _folder_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _visa_train_normals(root: Path, class_name: str) -> list[Path]:
    split_csv = root / "split_csv" / "1cls.csv"
    if not split_csv.is_file():
        raise DataError(f"{root} has no VisA layout: expected {split_csv}; pass --data_root")
    with open(split_csv, encoding="utf-8-sig", newline="") as file:
        rows = list(csv.DictReader(file))
    return sorted(
        root / row["image"]
        for row in rows
        if row.get("object") == class_name
        and row.get("split") == "train"
        and row.get("label") == "normal"
    )


def support_candidates(dataset: str | DatasetInfo, root: Path, class_name: str) -> list[Path]:
    """Every normal train-split image of a class, sorted; DataError when there is none."""
    info = get_dataset_info(dataset)
    root = Path(root)
    if info.layout == "visa":
        candidates = _visa_train_normals(root, class_name)
        where = f"{root / 'split_csv' / '1cls.csv'} (split train, label normal, {class_name})"
    elif info.layout == "dagm":
        train = root / class_name / "Train"
        labels = train / "Label" / "Labels.txt"
        defective = dagm_defective(labels) if labels.is_file() else {}
        candidates = [path for path in _folder_images(train) if path.name.lower() not in defective]
        where = f"{train} (the rows of Label/Labels.txt without a defect)"
    elif info.layout in NORMAL_TRAIN_FOLDERS:
        folder = root / class_name / "train" / NORMAL_TRAIN_FOLDERS[info.layout]
        candidates = _folder_images(folder)
        where = str(folder)
    else:
        msg = f"{info.name} has no train split of normal images for a k-shot memory; use --k_shot 0"
        raise DataError(msg)
    if not candidates:
        raise DataError(f"no normal train images in {where}; check --data_root or use --k_shot 0")
    return candidates


def draw_support(
    dataset: str | DatasetInfo, root: Path, class_name: str, k: int, seed: int
) -> list[Path]:
    """k normal train images of a class drawn with `random.Random(seed)` (all if fewer, as the
    original)."""
    if k < 1:
        raise DataError(f"--k_shot {k} must be >= 1 to draw a support set")
    candidates = support_candidates(dataset, root, class_name)
    if len(candidates) < k:
        logger.warning("%s: only %d support images for k=%d", class_name, len(candidates), k)
        return candidates
    return random.Random(seed).sample(candidates, k)


def load_images(paths: list[Path], preprocessing: Preprocessing) -> torch.Tensor:
    """Support images read and prepared as the test images are: `[len(paths), 3, S, S]`."""
    return torch.stack([preprocessing.load(path).image for path in paths])
