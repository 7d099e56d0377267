import os

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.anomaly import (
    CLIP_MEAN,
    CLIP_STD,
    TestDataset,
    TrainDataset,
    build_test_datasets,
    joint_augment,
    load_image,
    load_mask,
)
from datasets.metadata import build_records
from utils.errors import DataError

SIZE = 64


@pytest.fixture(scope="module")
def records(synthetic_root):
    all_records = build_records("Synthetic", synthetic_root)
    return [r for r in all_records if r["class_name"] == "tile"][::4]  # 4 normal, 4 anomalous


def test_train_item_shapes_and_dtypes(records, synthetic_root):
    dataset = TrainDataset(records, synthetic_root, SIZE)
    assert len(dataset) == 8
    for item in dataset:
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        assert item["class_name"] == "tile"
        assert item["file_name"].startswith("tile/test/")


def test_no_augment_equals_test_dataset(records, synthetic_root):
    train = TrainDataset(records, synthetic_root, SIZE, augment=False)
    test = TestDataset(records, synthetic_root, SIZE)
    for index in range(len(records)):
        train_item, test_item = train[index], test[index]
        torch.testing.assert_close(train_item["image"], test_item["image"])
        torch.testing.assert_close(train_item["mask"], test_item["mask"])
        assert train_item["label"] == test_item["label"] == records[index]["label"]
        assert test_item["mask"].any() == bool(records[index]["label"])
    assert test[0]["image_path"] == os.path.abspath(synthetic_root / records[0]["image_path"])


def test_load_image_normalises_and_converts_gray(tmp_path):
    Image.new("L", (30, 20), 255).save(tmp_path / "white.png")
    image = load_image(tmp_path / "white.png", 16)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(image, expected[:, None, None].expand(3, 16, 16))


def test_joint_augment_keeps_alignment():
    torch.manual_seed(0)
    mask = torch.zeros(1, 32, 32)
    mask[:, 4:12, 2:10] = 1
    image = mask.expand(3, -1, -1) * 5.0  # image = 5 exactly where the mask is 1
    flips = set()
    for _ in range(20):
        new_image, new_mask = joint_augment(image, mask)
        assert set(new_mask.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(new_image, new_mask.expand(3, -1, -1) * 5.0)
        flips.add(bool(new_mask[:, :, 16:].sum() > new_mask[:, :, :16].sum()))
    assert flips == {True, False}  # the defect moved right in some draws, with its image


def test_build_test_datasets_per_class(synthetic_root):
    datasets = build_test_datasets(build_records("Synthetic", synthetic_root), synthetic_root, 32)
    assert list(datasets) == ["tile", "stripes", "dots"]
    assert all(len(dataset) == 32 for dataset in datasets.values())


def test_corrupt_image_raises(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="cannot read image .*broken.png.*remove or replace"):
        load_image(tmp_path / "broken.png", SIZE)
    record = {"image_path": "broken.png", "label": 0, "class_name": "tile", "mask_path": ""}
    with pytest.raises(DataError, match="cannot read image"):
        TestDataset([record], tmp_path, SIZE)[0]


def test_mask_of_another_size_raises(tmp_path):
    Image.fromarray(np.full((10, 12), 255, dtype=np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DataError, match=r"is 12x10 but its image is 96x96; masks must match"):
        load_mask(tmp_path / "m.png", SIZE, (96, 96))
    assert load_mask(tmp_path / "m.png", 8, (12, 10)).sum() == 64
    assert load_mask(None, 8, (12, 10)).sum() == 0
