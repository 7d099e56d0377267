import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.metadata import (
    build_records,
    ensure_training_records,
    load_test_records,
    read_jsonl,
    sample_k_shot,
    write_jsonl,
)
from utils.core.errors import ConfigError, DataError


def _png(path: Path, size: tuple[int, int] = (8, 8), value: int = 0) -> None:
    """A uniform grayscale image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(path)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


@pytest.fixture(scope="module")
def synthetic_records(synthetic_root):
    return build_records("Synthetic", synthetic_root)


def test_build_records_synthetic(synthetic_root, synthetic_records):
    assert len(synthetic_records) == 96
    assert [r["class_name"] for r in synthetic_records[::32]] == ["tile", "stripes", "dots"]
    counts = Counter((r["class_name"], r["label"]) for r in synthetic_records)
    assert set(counts.values()) == {16}
    paths = [r["image_path"] for r in synthetic_records[:32]]
    assert paths == sorted(paths)
    for record in synthetic_records:
        if record["label"] == 0:
            assert record["mask_path"] == ""
            continue
        image = _read(synthetic_root / record["image_path"])
        mask = _read(synthetic_root / record["mask_path"])
        assert mask.shape == image.shape[:2]
        assert mask.any()


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass --data_root"):
        build_records("MVTec", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no MVTec layout: expected <class>/test/good"):
        build_records("MVTec", tmp_path)
    with pytest.raises(ConfigError, match="unknown data set"):
        build_records("NoSuchSet", tmp_path)


def test_mvtec_partial_classes_and_missing_mask(tmp_path, caplog):
    _png(tmp_path / "bottle" / "test" / "good" / "000.png")
    _png(tmp_path / "bottle" / "test" / "crack" / "000.png")
    _png(tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png", value=255)
    records = build_records("MVTec", tmp_path)
    assert [(r["label"], r["mask_path"]) for r in records] == [
        (1, "bottle/ground_truth/crack/000_mask.png"),
        (0, ""),
    ]
    assert "cable" in caplog.text
    _png(tmp_path / "bottle" / "test" / "crack" / "001.png")
    with pytest.raises(DataError, match="001.png has no mask"):
        build_records("MVTec", tmp_path)


def test_visa_with_bom(tmp_path):
    _png(tmp_path / "candle/Data/Images/Normal/0000.JPG")
    _png(tmp_path / "candle/Data/Images/Anomaly/000.png")
    _png(tmp_path / "candle/Data/Masks/Anomaly/000.png", value=255)
    _png(tmp_path / "pcb3/Data/Images/Normal/0001.png")
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "\ufeffobject,split,label,image,mask\n"
        "pcb3,test,normal,pcb3/Data/Images/Normal/0001.png,\n"
        "candle,train,normal,candle/Data/Images/Normal/9999.png,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.png,candle/Data/Masks/Anomaly/000.png\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n",
        encoding="utf-8",
    )
    records = build_records("VisA", tmp_path)
    assert [(r["class_name"], r["label"], r["mask_path"]) for r in records] == [
        ("candle", 1, "candle/Data/Masks/Anomaly/000.png"),
        ("candle", 0, ""),
        ("pcb3", 0, ""),
    ]


def test_btad(tmp_path):
    _png(tmp_path / "02" / "test" / "ok" / "0000.png")
    _png(tmp_path / "02" / "test" / "ko" / "0001.bmp")
    _png(tmp_path / "02" / "ground_truth" / "ko" / "0001.png", value=255)
    records = build_records("BTAD", tmp_path)
    assert [(r["image_path"], r["label"], r["mask_path"]) for r in records] == [
        ("02/test/ko/0001.bmp", 1, "02/ground_truth/ko/0001.png"),
        ("02/test/ok/0000.png", 0, ""),
    ]


def test_bmad(tmp_path):
    _png(tmp_path / "test" / "good" / "img" / "a.png")
    _png(tmp_path / "test" / "Ungood" / "img" / "b.png")
    _png(tmp_path / "test" / "Ungood" / "label" / "b.png", value=255)
    records = build_records("Brain", tmp_path)
    assert [(r["class_name"], r["label"], r["mask_path"]) for r in records] == [
        ("Brain", 1, "test/Ungood/label/b.png"),
        ("Brain", 0, ""),
    ]


def test_colon_all_anomalous(tmp_path):
    for name in ("1.png", "2.png"):
        _png(tmp_path / "images" / name)
        _png(tmp_path / "masks" / name, value=255)
    records = build_records("Colon_Kvasir", tmp_path)
    assert [(r["class_name"], r["label"]) for r in records] == [("Kvasir", 1), ("Kvasir", 1)]
    with pytest.raises(DataError, match="no colon layout"):
        build_records("Colon_cvc300", tmp_path / "images")


def test_jsonl_round_trip_and_original_format(tmp_path):
    records = [{"image_path": "a.png", "label": 0, "class_name": "x", "mask_path": ""}]
    write_jsonl(tmp_path / "r.jsonl", records)
    assert read_jsonl(tmp_path / "r.jsonl") == records
    assert os.listdir(tmp_path) == ["r.jsonl"]
    (tmp_path / "orig.jsonl").write_text(
        json.dumps({"image_path": "b.png", "label": 1.0, "class_name": "x", "mask_path": "m.png"})
        + "\n"
        + json.dumps({"image_path": "a.png", "label": 0.0, "class_name": "x"})
        + "\n"
    )
    assert [(r["label"], r["mask_path"]) for r in read_jsonl(tmp_path / "orig.jsonl")] == [
        (1, "m.png"),
        (0, ""),
    ]


def test_sample_k_shot(synthetic_records):
    first = sample_k_shot(synthetic_records, 5, seed=1)
    assert first == sample_k_shot(synthetic_records, 5, seed=1)
    assert first != sample_k_shot(synthetic_records, 5, seed=2)
    counts = Counter((r["class_name"], r["label"]) for r in first)
    classes = ("tile", "stripes", "dots")
    assert counts == {(c, label): 2 + label for c in classes for label in (0, 1)}  # 2 + 3
    assert [r["class_name"] for r in first[::5]] == ["tile", "stripes", "dots"]


def test_sample_k_shot_errors(synthetic_records):
    with pytest.raises(ConfigError, match=r"--shot 40 needs 20 normal images of class 'tile'"):
        sample_k_shot(synthetic_records, 40, seed=0)
    with pytest.raises(ConfigError, match="at least 1"):
        sample_k_shot(synthetic_records, 0, seed=0)


def test_ensure_training_records_writes_and_rereads(synthetic_root, tmp_path, caplog):
    caplog.set_level("INFO")
    few = ensure_training_records("Synthetic", synthetic_root, "few_shot", 4, 0, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["4-shot.jsonl", "full-shot.jsonl"]
    assert read_jsonl(tmp_path / "4-shot.jsonl") == few
    assert "sha256" in caplog.text
    assert ensure_training_records("Synthetic", synthetic_root, "few_shot", 4, 7, tmp_path) == few
    full = ensure_training_records("Synthetic", synthetic_root, "few_shot", 0, 0, tmp_path)
    assert full == load_test_records("Synthetic", synthetic_root, tmp_path)
    assert len(full) == 96
    assert ensure_training_records("Synthetic", synthetic_root, "full_shot", 4, 0, tmp_path) == full
    with pytest.raises(ConfigError, match="--training_mode"):
        ensure_training_records("Synthetic", synthetic_root, "zero_shot", 4, 0, tmp_path)


def test_unwritable_metadata_dir(synthetic_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="--metadata_dir"):
        load_test_records("Synthetic", synthetic_root, blocker / "sub")


def test_validation_of_read_records(synthetic_root, tmp_path):
    bad_class = [{"image_path": "tile/test/good/000.png", "label": 0, "class_name": "bottle"}]
    write_jsonl(tmp_path / "full-shot.jsonl", bad_class)
    with pytest.raises(ConfigError, match="class 'bottle' is not in Synthetic.*tile"):
        load_test_records("Synthetic", synthetic_root, tmp_path)
    missing = [{"image_path": "tile/test/good/999.png", "label": 0, "class_name": "tile"}]
    write_jsonl(tmp_path / "full-shot.jsonl", missing)
    with pytest.raises(DataError, match="999.png is listed in the metadata but missing"):
        load_test_records("Synthetic", synthetic_root, tmp_path)
