"""The MVTec AD 2 submission tree on the miniature data set: a tree written image by image
passes the check, and a missing, an extra, a wrong-size or a wrong-type file is a one-line error
naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from datasets.catalog import MVTEC_AD2_PRIVATE_SPLITS, mvtec_ad2_info
from datasets.metadata import build_records
from utils.core.errors import DataError
from utils.evaluation.submission import check_submission, submission_paths, write_anomaly_map

THRESHOLD = 0.75


def smooth_map(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth [H, W] float32 map from 0 to 1 (a tilted ramp), as an upsampled model map is."""
    tilt = np.float32(np.random.default_rng(seed).uniform(0.2, 0.8))
    rows = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    return tilt * rows + (1 - tilt) * cols


@pytest.fixture(scope="module")
def written(mvtec_ad2_root, tmp_path_factory) -> Path:
    """Every private-split image's map of the miniature data set, written one at a time."""
    submission = tmp_path_factory.mktemp("submission") / "run"
    for split in MVTEC_AD2_PRIVATE_SPLITS:
        for index, record in enumerate(build_records(mvtec_ad2_info(split), mvtec_ad2_root)):
            with Image.open(mvtec_ad2_root / record["image_path"]) as image:
                width, height = image.size
            anomaly_map = smooth_map(width, height, index)
            if index == 0:
                anomaly_map = torch.from_numpy(anomaly_map)  # a tensor is taken as well
            write_anomaly_map(
                submission, mvtec_ad2_root, record["image_path"], anomaly_map, THRESHOLD
            )
    return submission


@pytest.fixture
def submission(written, tmp_path) -> Path:
    """A copy of the written tree that a test may break."""
    return Path(shutil.copytree(written, tmp_path / "run"))


def one_line_data_error(submission: Path, root: Path) -> str:
    with pytest.raises(DataError) as error:
        check_submission(submission, root)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_written_tree_passes(written, mvtec_ad2_root):
    assert check_submission(written, mvtec_ad2_root) == 18  # 3 classes x 2 splits x 3 images
    assert sorted(path.name for path in written.iterdir()) == [
        "anomaly_images",
        "anomaly_images_thresholded",
    ]
    assert sorted(path.name for path in (written / "anomaly_images").iterdir()) == [
        "can",
        "fabric",
        "vial",
    ]
    assert not list(written.rglob("test_public")) and not list(written.rglob("*.tmp"))
    continuous = written / "anomaly_images/can/test_private_mixed/002_mixed.tiff"
    thresholded = written / "anomaly_images_thresholded/can/test_private_mixed/002_mixed.png"
    values = tifffile.imread(continuous)
    assert values.dtype == np.float16 and values.shape == (1024, 2232)
    expected = smooth_map(2232, 1024, 2)
    np.testing.assert_array_equal(values, expected.astype(np.float16))
    binary = np.array(Image.open(thresholded))
    assert binary.dtype == np.uint8
    np.testing.assert_array_equal(binary, np.where(expected > THRESHOLD, 255, 0))
    assert 0 < (binary == 255).mean() < 1


def test_a_missing_file_is_named(submission, mvtec_ad2_root):
    (submission / "anomaly_images/vial/test_private/001_regular.tiff").unlink()
    message = one_line_data_error(submission, mvtec_ad2_root)
    assert "anomaly_images/vial/test_private/ lacks 001_regular.tiff (2 of 3 maps there)" in message


def test_an_extra_file_is_named(submission, mvtec_ad2_root):
    extra = submission / "anomaly_images_thresholded/fabric/test_private_mixed/003_mixed.png"
    shutil.copy(extra.with_name("000_mixed.png"), extra)
    message = one_line_data_error(submission, mvtec_ad2_root)
    assert "anomaly_images_thresholded/fabric/test_private_mixed/ holds 003_mixed.png" in message
    extra.unlink()
    (submission / "notes.txt").write_text("not for the server")
    assert "./ holds notes.txt" in one_line_data_error(submission, mvtec_ad2_root)


def test_a_public_split_or_an_unknown_class_is_extra(submission, mvtec_ad2_root):
    (submission / "anomaly_images/can/test_public").mkdir()
    assert "anomaly_images/can/ holds test_public" in one_line_data_error(
        submission, mvtec_ad2_root
    )
    (submission / "anomaly_images/can/test_public").rmdir()
    shutil.copytree(submission / "anomaly_images/can", submission / "anomaly_images/rice")
    assert "anomaly_images/ holds rice" in one_line_data_error(submission, mvtec_ad2_root)


def test_a_wrong_size_file_is_named(submission, mvtec_ad2_root):
    path = submission / "anomaly_images/fabric/test_private/002_regular.tiff"
    tifffile.imwrite(path, np.zeros((640, 640), dtype=np.float16))
    message = one_line_data_error(submission, mvtec_ad2_root)
    assert "anomaly_images/fabric/test_private/002_regular.tiff has shape (640, 640)" in message
    assert "its image is 1280 x 1280" in message


def test_a_wrong_type_or_value_is_named(submission, mvtec_ad2_root):
    path = submission / "anomaly_images/vial/test_private_mixed/000_mixed.tiff"
    tifffile.imwrite(path, np.zeros((1400, 1000), dtype=np.float32))
    message = one_line_data_error(submission, mvtec_ad2_root)
    assert "anomaly_images/vial/test_private_mixed/000_mixed.tiff is float32" in message
    tifffile.imwrite(path, np.zeros((1400, 1000), dtype=np.float16))
    png = submission / "anomaly_images_thresholded/vial/test_private/000_regular.png"
    Image.fromarray(np.full((1400, 1000), 1, dtype=np.uint8)).save(png)
    assert "000_regular.png holds values other than 0 and 255" in one_line_data_error(
        submission, mvtec_ad2_root
    )


def test_the_writer_refuses_what_the_server_would(tmp_path, mvtec_ad2_root):
    with pytest.raises(DataError, match="can/test_public/good/000.png is not an image of"):
        submission_paths(tmp_path, "can/test_public/good/000.png")
    with pytest.raises(DataError, match=r"shape \(512, 512\) but its image is 1024 x 2232"):
        write_anomaly_map(
            tmp_path, mvtec_ad2_root, "can/test_private/000_regular.png", np.zeros((512, 512)), 0.5
        )
    with pytest.raises(DataError, match="float16's range"):
        write_anomaly_map(
            tmp_path,
            mvtec_ad2_root,
            "vial/test_private/000_regular.png",
            np.full((1400, 1000), 1e6, dtype=np.float32),
            0.5,
        )
    assert not list(tmp_path.iterdir())  # nothing written
