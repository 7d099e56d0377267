import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from datasets.anomaly import (
    CLIP_MEAN,
    CLIP_STD,
    TestDataset,
    TrainDataset,
    build_test_datasets,
    joint_augment,
    load_image,
    load_mask,
    resize_image,
    to_pixels,
)
from datasets.metadata import build_records
from utils.core.errors import DataError

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


def test_to_pixels_gives_back_the_resized_image_exactly(tmp_path):
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]
    pictures.append(np.zeros((40, 30, 3), np.uint8))
    pictures.append(np.full((40, 30, 3), 255, np.uint8))
    for index, picture in enumerate(pictures):
        Image.fromarray(picture).save(tmp_path / f"{index}.png")
    for mode in ("square", "short_side_crop"):
        images = torch.stack([load_image(tmp_path / f"{i}.png", 16, mode) for i in range(5)])
        expected = [np.asarray(resize_image(Image.fromarray(p), 16, mode)) for p in pictures]
        np.testing.assert_array_equal(to_pixels(images), np.stack(expected))


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


def test_the_feclip_default_preprocessing_is_a_short_side_resize_and_centre_crop(tmp_path):
    from models.feclip import FEClipConfig

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))  # 100 x 60
    image.save(tmp_path / "wide.png")
    mask = np.zeros((60, 100), dtype=np.uint8)
    mask[10:50, 2:30] = 255  # mostly in the left third, which the crop drops
    Image.fromarray(mask).save(tmp_path / "wide_mask.png")
    records = [
        {"image_path": "wide.png", "label": 1, "class_name": "x", "mask_path": "wide_mask.png"}
    ]
    preprocessing = FEClipConfig().preprocessing(train=False)
    item = TestDataset(records, tmp_path, 32, preprocessing)[0]
    crop = transforms.Compose(
        [
            transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(32),
        ]
    )
    expected = transforms.functional.normalize(
        transforms.functional.to_tensor(crop(image)), CLIP_MEAN, CLIP_STD
    )
    torch.testing.assert_close(item["image"], expected, rtol=0, atol=0)
    mask_crop = transforms.Compose(
        [
            transforms.Resize(32, interpolation=transforms.InterpolationMode.NEAREST),
            transforms.CenterCrop(32),
        ]
    )
    expected_mask = (transforms.functional.to_tensor(mask_crop(Image.fromarray(mask))) > 0).float()
    torch.testing.assert_close(item["mask"], expected_mask, rtol=0, atol=0)


def test_sowa_masks_are_bilinear_with_the_originals_train_and_test_thresholds(tmp_path):
    from models.sowa import SOWAConfig

    mask = np.zeros((60, 90), dtype=np.uint8)  # not square, soft edges
    mask[20:40, 30:60] = 255
    mask[18:20, 30:60] = 96
    mask[40:43, 30:60] = 30
    Image.fromarray(mask).save(tmp_path / "m.png")
    binary = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8))  # the loader's > 0
    resized = transforms.functional.to_tensor(
        transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.BILINEAR)(binary)
    )
    config = SOWAConfig()
    train_mask = load_mask(tmp_path / "m.png", 32, (90, 60), config.preprocessing(train=True))
    test_mask = load_mask(tmp_path / "m.png", 32, (90, 60), config.preprocessing(train=False))
    torch.testing.assert_close(train_mask, (resized > 0).float(), rtol=0, atol=0)
    torch.testing.assert_close(test_mask, (resized > 0.5).float(), rtol=0, atol=0)
    assert train_mask.sum() > test_mask.sum()  # the bilinear edges count in training only
    nearest = load_mask(tmp_path / "m.png", 32, (90, 60))  # AA-CLIP's: nearest, any non-zero
    assert not torch.equal(nearest, train_mask)
