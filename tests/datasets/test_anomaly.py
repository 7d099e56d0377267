import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms, tv_tensors

from datasets.anomaly import TestDataset, TrainDataset, build_test_datasets, joint_augment
from datasets.metadata import build_records
from datasets.preprocessing import CLIP_MEAN, CLIP_STD, Preprocessing
from utils.core.errors import DataError

SIZE = 64
SQUARE = Preprocessing(SIZE)


@pytest.fixture(scope="module")
def records(synthetic_root):
    all_records = build_records("Synthetic", synthetic_root)
    return [r for r in all_records if r["class_name"] == "tile"][::4]  # 4 normal, 4 anomalous


def test_train_item_shapes_and_dtypes(records, synthetic_root):
    dataset = TrainDataset(records, synthetic_root, SQUARE)
    assert len(dataset) == 8
    for item in dataset:
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        assert item["class_name"] == "tile"
        assert item["file_name"].startswith("tile/test/")


def test_no_augment_equals_test_dataset(records, synthetic_root):
    train = TrainDataset(records, synthetic_root, SQUARE, augment=False)
    test = TestDataset(records, synthetic_root, SQUARE)
    for index in range(len(records)):
        train_item, test_item = train[index], test[index]
        torch.testing.assert_close(train_item["image"], test_item.image)
        torch.testing.assert_close(train_item["mask"], test_item.mask)
        assert train_item["label"] == test_item.label == records[index]["label"]
        assert test_item.mask.any() == bool(records[index]["label"])
        assert test_item.valid_mask.all() and "valid_mask" not in train_item
        assert test_item.file == records[index]["image_path"] and test_item.class_name == "tile"
    assert test[0].path == os.path.abspath(synthetic_root / records[0]["image_path"])


def test_load_image_normalises_and_converts_gray(tmp_path):
    Image.new("L", (30, 20), 255).save(tmp_path / "white.png")
    image = Preprocessing(16).load(tmp_path / "white.png").image
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(image, expected[:, None, None].expand(3, 16, 16))


def test_to_pixels_gives_back_the_resized_image_exactly(tmp_path):
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]
    pictures.append(np.zeros((40, 30, 3), np.uint8))
    pictures.append(np.full((40, 30, 3), 255, np.uint8))
    for index, picture in enumerate(pictures):
        Image.fromarray(picture).save(tmp_path / f"{index}.png")
    for mode in ("square", "short_side_crop", "letterbox"):
        preprocessing = Preprocessing(16, mode)
        images = torch.stack([preprocessing.load(tmp_path / f"{i}.png").image for i in range(5)])
        expected = [
            (preprocessing.pixels(Image.fromarray(p)) * 255).round().permute(1, 2, 0).numpy()
            for p in pictures
        ]
        np.testing.assert_array_equal(preprocessing.to_pixels(images), np.stack(expected))


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
    records = build_records("Synthetic", synthetic_root)
    datasets = build_test_datasets(records, synthetic_root, Preprocessing(32))
    assert list(datasets) == ["tile", "stripes", "dots"]
    assert all(len(dataset) == 32 for dataset in datasets.values())


def test_corrupt_image_raises(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="cannot read image .*broken.png.*remove or replace"):
        SQUARE.load(tmp_path / "broken.png")
    record = {"image_path": "broken.png", "label": 0, "class_name": "tile", "mask_path": ""}
    with pytest.raises(DataError, match="cannot read image"):
        TestDataset([record], tmp_path, SQUARE)[0]


def test_mask_of_another_size_raises(tmp_path):
    Image.fromarray(np.full((10, 12), 255, dtype=np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DataError, match=r"is 12x10 but its image is 96x96; masks must match"):
        SQUARE.load_mask(tmp_path / "m.png", (96, 96))
    assert Preprocessing(8).load_mask(tmp_path / "m.png", (12, 10)).sum() == 64
    assert Preprocessing(8).load_mask(None, (12, 10)).sum() == 0
    resized = Preprocessing(8, resize_masks=True).load_mask(tmp_path / "m.png", (96, 96))
    assert resized.sum() == 64  # --resize_masks: stretched onto its image, as the original


def test_the_feclip_default_preprocessing_is_the_forks_float_resize_and_centre_crop(tmp_path):
    from torchvision.transforms import v2

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
    preprocessing = FEClipConfig(img_size=32).preprocessing(train=False)
    item = TestDataset(records, tmp_path, preprocessing)[0]
    # The fork: anomalib reads float tensors and masks, its pre-processor runs torchvision v2
    # Resize(S, bicubic, antialias) + CenterCrop(S) + Normalize on both (masks: nearest).
    fork = v2.Compose(
        [
            v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop((32, 32)),
            v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ]
    )
    float_image = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
    fork_mask = tv_tensors.Mask(torch.from_numpy(mask // 255))
    expected, expected_mask = fork(tv_tensors.Image(float_image), fork_mask)
    torch.testing.assert_close(item.image, expected.as_subclass(torch.Tensor), rtol=0, atol=0)
    torch.testing.assert_close(item.mask[0], expected_mask.float(), rtol=0, atol=0)
    # --resize_backend pil: the 8-bit PIL resize this project used before
    pil = dataclasses.replace(preprocessing, backend="pil")
    crop = transforms.Compose(
        [
            transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(32),
        ]
    )
    expected_pil = transforms.functional.normalize(
        transforms.functional.to_tensor(crop(image)), CLIP_MEAN, CLIP_STD
    )
    torch.testing.assert_close(pil(image).image, expected_pil, rtol=0, atol=0)
    assert not torch.equal(pil(image).image, item.image)


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
    config = SOWAConfig(img_size=32)
    train_mask = config.preprocessing(train=True).load_mask(tmp_path / "m.png", (90, 60))
    test_mask = config.preprocessing(train=False).load_mask(tmp_path / "m.png", (90, 60))
    torch.testing.assert_close(train_mask, (resized > 0).float(), rtol=0, atol=0)
    torch.testing.assert_close(test_mask, (resized > 0.5).float(), rtol=0, atol=0)
    assert train_mask.sum() > test_mask.sum()  # the bilinear edges count in training only
    nearest = Preprocessing(32).load_mask(tmp_path / "m.png", (90, 60))  # AA-CLIP's: nearest
    assert not torch.equal(nearest, train_mask)
