"""MVTec AD 2 (`--dataset MVTecAD2 --split ...`): the miniature tree in the publisher's naming,
the records of each split checked exactly, the unlabelled private splits refused for training,
k-shot sampling and thresholds, and each broken layout a one-line error."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.catalog import (
    CATALOG,
    MVTEC_AD2_SPLITS,
    DataConfig,
    get_dataset_info,
    mvtec_ad2_info,
    real_name,
)
from datasets.metadata import (
    UNLABELLED,
    build_records,
    ensure_training_records,
    load_test_records,
    read_jsonl,
    require_labelled,
    sample_k_shot,
)
from datasets.support import support_candidates
from datasets.synthetic_mvtec_ad2 import CLASSES, generate
from tests.datasets.test_layouts import r
from utils.core.errors import ConfigError, DataError


def image(path: Path, size: tuple[int, int] = (24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), 100, dtype=np.uint8)).save(path)


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*.png"))
    }


# ----------------------------------------------------------------------------------------------
# The miniature tree.
def test_miniature_tree_in_the_publishers_naming(mvtec_ad2_root):
    root = mvtec_ad2_root
    assert (root / "license.txt").is_file() and (root / "readme.txt").is_file()
    assert sorted(path.name for path in root.iterdir() if path.is_dir()) == sorted(CLASSES)
    for class_name, (_, size) in CLASSES.items():
        folder = root / class_name
        public = folder / "test_public"
        assert sorted(p.name for p in (public / "good").iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (public / "bad").iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (public / "ground_truth" / "bad").iterdir()) == [
            "000_mask.png",
            "001_mask.png",
        ]
        assert sorted(p.name for p in (folder / "test_private").iterdir()) == [
            f"{index:03d}_regular.png" for index in range(3)
        ]
        assert sorted(p.name for p in (folder / "test_private_mixed").iterdir()) == [
            f"{index:03d}_mixed.png" for index in range(3)
        ]
        assert len(list((folder / "validation" / "good").iterdir())) == 2
        assert len(list((folder / "train" / "good").iterdir())) == 2
        for path in folder.rglob("*.png"):
            with Image.open(path) as picture:
                assert picture.size == size, path
        for mask_path in (public / "ground_truth" / "bad").iterdir():
            mask = np.array(Image.open(mask_path))
            assert set(np.unique(mask)) == {0, 255}
            assert 0 < (mask > 0).mean() < 0.01  # thin lines and small spots
            painted = np.array(Image.open(public / "bad" / mask_path.name.replace("_mask", "")))
            assert np.isin(painted[mask > 0], (15, 245)).all()  # exactly the painted pixels
    sides = [side for _, size in CLASSES.values() for side in size]
    assert min(sides) >= 1000 and max(sides) <= 2500
    assert any(width != height for _, (width, height) in CLASSES.values())
    with Image.open(root / "vial" / "train" / "good" / "000.png") as gray:
        assert gray.mode == "L"  # vial ships single-channel images


def test_miniature_tree_is_deterministic_for_a_seed(tmp_path, mvtec_ad2_root):
    assert _digests(generate(tmp_path / "again", seed=0)) == _digests(mvtec_ad2_root)
    with pytest.raises(DataError, match="no complete miniature"):
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "x.txt").write_text("x")
        generate(tmp_path / "busy")


# ----------------------------------------------------------------------------------------------
# Catalog and records.
def test_catalog_entry_and_split_setting():
    info = get_dataset_info("MVTecAD2")
    assert info is CATALOG["MVTecAD2"]
    assert info.domain == "Industrial" and info.layout == "mvtec_ad2"
    assert info.classes == (
        "can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts",
    )  # fmt: skip
    assert real_name("MVTecAD2", "vial") == "glass vial"
    assert dict(info.options) == {"split": "test_public"}
    assert DataConfig(dataset="MVTecAD2").dataset_info() == info
    validation = DataConfig(dataset="MVTecAD2", split="validation").dataset_info()
    assert dict(validation.options) == {"split": "validation"}
    assert MVTEC_AD2_SPLITS[0] == "test_public"
    with pytest.raises(ConfigError, match="--split test.*test_public, validation"):
        mvtec_ad2_info("test")


def test_test_public_records_are_paths_not_stems(mvtec_ad2_root):
    records = build_records("MVTecAD2", mvtec_ad2_root)
    gt = "test_public/ground_truth/bad"
    assert records[:4] == [
        r("can/test_public/bad/000.png", 1, "can", f"can/{gt}/000_mask.png"),
        r("can/test_public/bad/001.png", 1, "can", f"can/{gt}/001_mask.png"),
        r("can/test_public/good/000.png", 0, "can"),
        r("can/test_public/good/001.png", 0, "can"),
    ]
    assert [record["class_name"] for record in records] == ["can"] * 4 + ["fabric"] * 4 + [
        "vial"
    ] * 4
    assert len({record["image_path"] for record in records}) == len(records) == 12


def test_validation_and_private_records(mvtec_ad2_root):
    validation = build_records(mvtec_ad2_info("validation"), mvtec_ad2_root)
    assert validation[:2] == [
        r("can/validation/good/000.png", 0, "can"),
        r("can/validation/good/001.png", 0, "can"),
    ]
    assert len(validation) == 6 and {record["label"] for record in validation} == {0}
    for split, suffix in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        private = build_records(mvtec_ad2_info(split), mvtec_ad2_root)
        assert private[:3] == [
            r(f"can/{split}/{index:03d}_{suffix}.png", UNLABELLED, "can") for index in range(3)
        ]
        assert len(private) == 9
        assert all(record["label"] == UNLABELLED and not record["mask_path"] for record in private)


def test_each_split_keeps_its_own_metadata_file(mvtec_ad2_root, tmp_path):
    for split, file_name in (
        ("test_public", "full-shot.jsonl"),
        ("validation", "validation.jsonl"),
        ("test_private", "test_private.jsonl"),
    ):
        records = load_test_records(mvtec_ad2_info(split), mvtec_ad2_root, tmp_path)
        assert read_jsonl(tmp_path / file_name) == records  # -1 survives the jsonl round trip
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "full-shot.jsonl",
        "test_private.jsonl",
        "validation.jsonl",
    ]


# ----------------------------------------------------------------------------------------------
# The unlabelled splits are never trained on, sampled or used for thresholds.
def test_private_splits_are_refused_for_training_sampling_and_thresholds(mvtec_ad2_root, tmp_path):
    for split in ("test_private", "test_private_mixed", "validation"):
        with pytest.raises(ConfigError, match=f"not --split {split}.*--split test_public"):
            ensure_training_records(
                mvtec_ad2_info(split), mvtec_ad2_root, "few_shot", 2, 0, tmp_path
            )
    assert not list(tmp_path.iterdir())  # refused before anything was written
    private = build_records(mvtec_ad2_info("test_private"), mvtec_ad2_root)
    with pytest.raises(ConfigError, match="--shot 2 sampling needs labelled images.*9 records"):
        sample_k_shot(private, 2, 0)
    with pytest.raises(ConfigError, match="a SegF1 threshold needs labelled images"):
        require_labelled(private, "a SegF1 threshold")
    require_labelled(build_records(mvtec_ad2_info("validation"), mvtec_ad2_root), "a threshold")
    trained = ensure_training_records("MVTecAD2", mvtec_ad2_root, "few_shot", 2, 0, tmp_path)
    assert {record["label"] for record in trained} == {0, 1}
    assert all("/test_public/" in record["image_path"] for record in trained)


def test_support_images_come_from_train_good(mvtec_ad2_root):
    candidates = support_candidates("MVTecAD2", mvtec_ad2_root, "fabric")
    assert [path.relative_to(mvtec_ad2_root).as_posix() for path in candidates] == [
        "fabric/train/good/000.png",
        "fabric/train/good/001.png",
    ]


# ----------------------------------------------------------------------------------------------
# Hand-built trees: any image extension, what is not a record, broken layouts.
def test_any_image_extension_and_the_root_files(tmp_path):
    (tmp_path / "license.txt").write_text("CC BY-NC-SA 4.0")
    (tmp_path / "readme.txt").write_text("MVTec AD 2")
    image(tmp_path / "rice/test_public/good/000.PNG")
    image(tmp_path / "rice/test_public/bad/000.jpg")
    image(tmp_path / "rice/test_public/ground_truth/bad/000_mask.png")
    image(tmp_path / "rice/train/good/000.png")
    (tmp_path / "rice/test_public/good/notes.txt").write_text("not an image")
    assert build_records("MVTecAD2", tmp_path) == [
        r(
            "rice/test_public/bad/000.jpg",
            1,
            "rice",
            "rice/test_public/ground_truth/bad/000_mask.png",
        ),
        r("rice/test_public/good/000.PNG", 0, "rice"),
    ]


def test_missing_class_folder_is_skipped_with_a_warning(tmp_path, caplog):
    image(tmp_path / "walnuts/test_private/000_regular.png")
    with caplog.at_level(logging.WARNING, logger="datasets.metadata"):
        records = build_records(mvtec_ad2_info("test_private"), tmp_path)
    assert records == [r("walnuts/test_private/000_regular.png", UNLABELLED, "walnuts")]
    assert "class folder" in caplog.text and "can" in caplog.text


@pytest.mark.parametrize(
    ("build", "split", "message"),
    [
        (
            lambda root: None,
            "test_public",
            r"has no MVTecAD2 layout: expected <class>/test_public/",
        ),
        (
            lambda root: (root / "can/test_private").mkdir(parents=True),
            "test_private",
            r"can/test_private holds no images; restore can's test_private split",
        ),
        (
            lambda root: image(root / "can/test_public/good/000.png"),
            "validation",
            r"can/validation holds no images",
        ),
        (
            lambda root: image(root / "can/test_public/bad/000.png"),
            "test_public",
            r"anomalous image .*000.png has no mask .*ground_truth/bad/000_mask.png",
        ),
    ],
)
def test_broken_layouts_are_one_line_errors(tmp_path, build, split, message):
    tmp_path.joinpath("license.txt").write_text("x")
    build(tmp_path)
    with pytest.raises(DataError, match=message) as error:
        build_records(mvtec_ad2_info(split), tmp_path)
    assert "\n" not in str(error.value)
