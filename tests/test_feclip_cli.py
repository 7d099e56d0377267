"""FE-CLIP's training and evaluation commands end to end on the tiny backbone and synthetic set."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import test as test_script
import train
import train_feclip
from utils.core.checkpoint import load_checkpoint

FAST = ["--batch_size", "8", "--training_mode", "few_shot", "--shot", "8", "--device", "cpu"]


def train_args(data_root, save_path, *extra):
    return ["--data_root", str(data_root), "--save_path", str(save_path), *FAST, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """Two epochs through `train.py --model feclip`, shared read-only by the tests below."""
    data_root = tmp_path_factory.mktemp("feclip") / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    save_path = data_root.parent / "run"
    argv = ["--model", "feclip", *train_args(data_root, save_path, "--epochs", "2")]
    assert train.main(argv) == 0
    return data_root, save_path


def test_training_writes_checkpoints_and_config(trained):
    _, save_path = trained
    names = {path.name for path in save_path.iterdir()}
    assert {"feclip.pth", "feclip_1.pth", "feclip_2.pth", "config.yaml"} <= names
    assert "train_feclip.log" in names
    payload = load_checkpoint(save_path / "feclip.pth")
    assert {"epoch", "feclip", "optimizer", "config", "rng"} <= set(payload)
    assert payload["epoch"] == 2 and payload["config"]["model"] == "feclip"
    assert not any(key.startswith("clipmodel.") for key in payload["feclip"])
    config = yaml.safe_load((save_path / "config.yaml").read_text())
    assert config["tap_indices"] == [15, 18, 21, 23] and config["img_size"] == 64
    first = load_checkpoint(save_path / "feclip_1.pth")["feclip"]
    assert not torch.equal(first["ffe.0.fc.weight"], payload["feclip"]["ffe.0.fc.weight"])


def test_evaluation_writes_results(trained, capsys):
    data_root, save_path = trained
    argv = ["--model", "feclip", "--save_path", str(save_path), "--data_root", str(data_root)]
    assert test_script.main([*argv, "--device", "cpu"]) == 0
    for suffix in ("json", "csv", "md"):
        assert (save_path / f"results_Synthetic.{suffix}").is_file()
    results = json.loads((save_path / "results_Synthetic.json").read_text())
    assert results["meta"]["model"] == "feclip" and results["meta"]["epoch"] == 2
    assert results["meta"]["smoothing"].startswith("none")
    printed = capsys.readouterr().out
    assert "| mean |" in printed and "I-AUROC" in printed


def test_resume_matches_an_uninterrupted_run(trained, tmp_path):
    data_root, full = trained
    resumed = tmp_path / "resumed"
    assert train_feclip.main(train_args(data_root, resumed, "--epochs", "1")) == 0
    assert train_feclip.main(train_args(data_root, resumed, "--epochs", "2")) == 0
    expected = load_checkpoint(full / "feclip.pth")
    got = load_checkpoint(resumed / "feclip.pth")
    assert got["epoch"] == 2
    for key, value in expected["feclip"].items():
        assert torch.equal(got["feclip"][key], value), key


def test_resume_with_other_flags_names_the_setting(trained, tmp_path, caplog, one_line_error):
    data_root, save_path = trained
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(save_path / "feclip.pth", run / "feclip.pth")
    shutil.copy(save_path / "config.yaml", run / "config.yaml")
    before = (run / "config.yaml").read_text()
    argv = train_args(data_root, run, "--epochs", "3", "--tap_indices", "5", "11", "17", "23")
    assert train_feclip.main(argv) == 2
    assert "tap_indices" in one_line_error() and "pass --tap_indices 15 18 21 23" in (
        one_line_error()
    )
    assert (run / "config.yaml").read_text() == before
    assert load_checkpoint(run / "feclip.pth")["epoch"] == 2


def test_bad_flag_and_missing_checkpoint_are_one_line(trained, tmp_path, caplog, one_line_error):
    data_root, _ = trained
    assert train_feclip.main(train_args(data_root, tmp_path / "a", "--lfs_window", "2")) == 2
    assert "--lfs_window 2" in one_line_error()
    caplog.clear()
    argv = ["--model", "feclip", "--save_path", str(tmp_path / "empty"), "--device", "cpu"]
    (tmp_path / "empty").mkdir()
    assert test_script.main([*argv, "--data_root", str(data_root)]) == 2
    assert "feclip.pth" in one_line_error()
