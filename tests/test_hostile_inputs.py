"""Hostile input ends in one line and rc 2, and writes nothing outside the output folder:
broken or mistyped `--config` YAML, trust switched on from a file, malformed or duplicate records,
a Folder root whose `normal` is a file, names that would be paths out of the output, and typos of
model and data set names (with the closest names offered)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

import test as test_script
import train
from datasets.catalog import get_dataset_info
from datasets.metadata import load_test_records, read_jsonl, write_jsonl
from utils.core.errors import DataError
from utils.engine import job as training_job

FECLIP_RUN = [
    "--model", "feclip", "--device", "cpu", "--training_mode", "few_shot", "--shot", "4",
    "--batch_size", "4", "--epochs", "1",
]  # fmt: skip


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, synthetic_root):
    root = tmp_path_factory.mktemp("hostile") / "Synthetic"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """An FE-CLIP run of one epoch on the tiny backbone."""
    save_path = tmp_path_factory.mktemp("run") / "feclip"
    argv = [*FECLIP_RUN, "--data_root", str(data_root), "--save_path", str(save_path)]
    assert train.main(argv) == 0
    return save_path


YAML_CASES = {
    "broken": (b"seed: 1\ndataset: [MVTec\n", r"line 3 column 1 is not valid YAML \(.+\)"),
    "list_for_int": (b"seed: [1, 2]\n", r"seed is \[1, 2\], expected a value of type int"),
    "int_for_list": (b"block_indices: 5\n", r"block_indices is 5, expected .* list of int"),
    "list_for_str": (b"dataset: [MVTec]\n", r"dataset is \['MVTec'\], expected .* type str"),
    "bool_for_int": (b"shot: true\n", r"shot is True, expected a value of type int"),
    "not_utf8": (b"seed: \xff\xfe\n", r"is not UTF-8 text \(byte 6\)"),
    "trust": (b"trust_checkpoint: true\n", r"sets trust_checkpoint, which only the command line"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_a_bad_config_file_is_one_line_before_any_work(case, tmp_path, one_line_error):
    content, message = YAML_CASES[case]
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    argv = [*FECLIP_RUN, "--config", str(config), "--save_path", str(tmp_path / "run")]
    assert train.main(argv) == 2
    error = one_line_error()
    assert str(config) in error
    assert re.search(message, error), error
    assert files_under(tmp_path) == {config}


def test_a_mapping_for_a_list_of_floats_is_refused(tmp_path, one_line_error):
    config = tmp_path / "bad.yaml"
    config.write_text("betas: {a: 1}\n")
    argv = ["--model", "aaclip", "--config", str(config), "--save_path", str(tmp_path / "run")]
    assert train.main(argv) == 2
    assert "betas is {'a': 1}, expected a value of type list of 2 float" in one_line_error()


def test_test_py_checks_its_config_file_too(tmp_path, one_line_error):
    config = tmp_path / "bad.yaml"
    config.write_text("seed: [1, 2]\n")
    assert test_script.main(["--config", str(config), "--results_dir", str(tmp_path / "r")]) == 2
    assert "seed is [1, 2]" in one_line_error()
    assert files_under(tmp_path) == {config}


def test_trust_on_the_command_line_is_a_warning(caplog):
    caplog.set_level(logging.WARNING)
    job = training_job.parse_args(["--trust_checkpoint"], "feclip")
    assert job.run.trust_checkpoint
    assert "--trust_checkpoint is on" in caplog.text


def write_records(folder: Path, lines: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "full-shot.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


GOOD = {"image_path": "tile/test/good/000.png", "label": 0, "class_name": "tile", "mask_path": ""}


@pytest.mark.parametrize("script", ["train", "test"])
def test_a_label_outside_0_1_is_one_line_naming_file_and_line(
    script, data_root, tmp_path, one_line_error
):
    path = write_records(tmp_path / "meta", [GOOD, {**GOOD, "label": 2, "image_path": "x.png"}])
    common = ["--data_root", str(data_root), "--metadata_dir", str(tmp_path / "meta")]
    if script == "train":
        argv = [*FECLIP_RUN, *common, "--save_path", str(tmp_path / "run")]
        assert train.main(argv) == 2
    else:
        argv = [*common, "--model", "feclip", "--save_path", str(tmp_path / "run")]
        assert test_script.main([*argv, "--results_dir", str(tmp_path / "results")]) == 2
    assert f"{path} line 2 is not a metadata record (label 2 is not one of 0, 1)" in (
        one_line_error()
    )


def test_duplicate_records_are_refused_with_both_lines(data_root, tmp_path, one_line_error):
    path = write_records(tmp_path / "meta", [GOOD, {**GOOD, "label": 1}, GOOD])
    argv = ["--data_root", str(data_root), "--metadata_dir", str(tmp_path / "meta")]
    argv += ["--save_path", str(tmp_path / "run"), "--results_dir", str(tmp_path / "results")]
    assert test_script.main(argv) == 2
    assert f"{path} lists tile/test/good/000.png twice (lines 1 and 2)" in one_line_error()


def test_unlabelled_records_only_in_the_private_splits_files(tmp_path):
    unlabelled = [{**GOOD, "label": -1}]
    write_jsonl(tmp_path / "test_private.jsonl", unlabelled)
    assert read_jsonl(tmp_path / "test_private.jsonl")[0]["label"] == -1
    write_jsonl(tmp_path / "full-shot.jsonl", unlabelled)
    with pytest.raises(DataError, match="line 1 .*label -1 is not one of 0, 1"):
        read_jsonl(tmp_path / "full-shot.jsonl")
    for bad, reason in (({**GOOD, "label": True}, "label True"), ({"label": 0}, "no image_path")):
        write_jsonl(tmp_path / "full-shot.jsonl", [bad])
        with pytest.raises(DataError, match=reason):
            read_jsonl(tmp_path / "full-shot.jsonl")


def test_records_outside_the_data_root_need_the_flag(data_root, tmp_path, one_line_error, caplog):
    outside = tmp_path / "outside.png"
    shutil.copy(data_root / GOOD["image_path"], outside)
    escapes = [f"../../{tmp_path.name}/outside.png", str(outside)]
    for index, image in enumerate(escapes):
        meta = tmp_path / f"meta{index}"
        write_records(meta, [GOOD, {**GOOD, "image_path": image}])
        argv = ["--data_root", str(data_root), "--metadata_dir", str(meta)]
        argv += ["--save_path", str(tmp_path / "run"), "--results_dir", str(tmp_path / "results")]
        assert test_script.main(argv) == 2
        error = one_line_error()
        assert "outside the data root" in error and "--allow_outside_root" in error
        caplog.clear()
    link_root = tmp_path / "linked"
    (link_root / "tile").mkdir(parents=True)
    (link_root / "tile" / "a.png").symlink_to(outside)
    write_records(tmp_path / "meta2", [{**GOOD, "image_path": "tile/a.png"}])
    info = get_dataset_info("Synthetic")
    with pytest.raises(DataError, match="outside the data root"):
        load_test_records(info, link_root, tmp_path / "meta2")
    allowed = dataclasses.replace(info, allow_outside_root=True)
    assert len(load_test_records(allowed, link_root, tmp_path / "meta2")) == 1


def folder_root(data_root: Path, root: Path) -> Path:
    """A Folder data set from the synthetic tile class: normal/, abnormal/, masks/."""
    for name in ("normal", "abnormal", "masks"):
        (root / name).mkdir(parents=True)
    for image in sorted((data_root / "tile" / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(image, root / "normal" / image.name)
    for image in sorted((data_root / "tile" / "test" / "blob").glob("*.png"))[:2]:
        shutil.copy(image, root / "abnormal" / image.name)
        mask = data_root / "tile" / "ground_truth" / "blob" / f"{image.stem}_mask.png"
        shutil.copy(mask, root / "masks" / image.name)
    return root


def test_a_folder_root_whose_normal_is_a_file_is_one_line(data_root, tmp_path, one_line_error):
    root = folder_root(data_root, tmp_path / "mine")
    shutil.rmtree(root / "normal")
    (root / "normal").write_text("not a folder")
    argv = ["--dataset", "Folder", "--data_root", str(root), "--model", "feclip"]
    argv += ["--save_path", str(tmp_path / "run"), "--results_dir", str(tmp_path / "results")]
    assert test_script.main(argv) == 2
    assert f"{root / 'normal'} is a file, not a folder of images" in one_line_error()


def test_a_class_name_with_dots_and_slashes_stays_inside_the_results(data_root, trained, tmp_path):
    root = folder_root(data_root, tmp_path / "data" / "mine")
    results = tmp_path / "out" / "results"
    before = files_under(tmp_path)
    argv = ["--dataset", "Folder", "--data_root", str(root), "--class_name", "../../../x"]
    argv += ["--save_path", str(trained), "--results_dir", str(results), "--visualize"]
    argv += ["--device", "cpu", "--metadata_dir", str(tmp_path / "out" / "meta")]
    assert test_script.main(argv) == 0
    written = files_under(tmp_path) - before
    assert all(path.is_relative_to(tmp_path / "out") for path in written), written
    panels = sorted((results / "visualization" / "Folder" / "x").glob("*.png"))
    assert [path.name for path in panels] == [
        "abnormal_000.png", "abnormal_001.png", "normal_000.png", "normal_001.png",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model_name", "ViT-L-14-33"], "did you mean ViT-L-14-336, "),
        (["--dataset", "MVtec"], "did you mean MVTec"),
        (["--model", "feclp"], "did you mean feclip?"),
        (["--amp", "fp61"], "did you mean fp16?"),
    ],
)
def test_a_typo_gets_the_closest_names(flags, expected, tmp_path, one_line_error):
    argv = ["--model", "feclip", "--device", "cpu", "--save_path", str(tmp_path / "run")]
    assert train.main([*argv, *flags]) == 2
    error = one_line_error()
    assert expected in error and len(error) < 400, error
    if flags[0] == "--model_name":
        assert "open_clip.list_models() lists all" in error


def test_test_py_on_a_missing_save_path_creates_nothing(tmp_path, one_line_error):
    missing = tmp_path / "never_trained"
    assert test_script.main(["--save_path", str(missing), "--device", "cpu"]) == 2
    message = one_line_error()
    assert f"--save_path {missing} does not exist" in message and "train first" in message
    assert not missing.exists()
