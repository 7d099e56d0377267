"""SOWA training and k-shot evaluation end to end on the tiny backbone and synthetic set."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import test as test_script
import train
import train_sowa
from utils.core.checkpoint import load_checkpoint

FAST = ["--batch_size", "8", "--training_mode", "few_shot", "--shot", "8", "--device", "cpu"]


def train_args(data_root, save_path, *extra):
    return ["--data_root", str(data_root), "--save_path", str(save_path), *FAST, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """Two epochs through `train.py --model sowa`, shared read-only by the tests below."""
    data_root = tmp_path_factory.mktemp("sowa") / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    save_path = data_root.parent / "run"
    argv = ["--model", "sowa", *train_args(data_root, save_path, "--epochs", "2")]
    assert train.main(argv) == 0
    return data_root, save_path


def test_training_writes_checkpoints_and_config(trained):
    _, save_path = trained
    names = {path.name for path in save_path.iterdir()}
    assert {"sowa.pth", "sowa_1.pth", "sowa_2.pth", "config.yaml", "train_sowa.log"} <= names
    payload = load_checkpoint(save_path / "sowa.pth")
    assert {"epoch", "sowa", "optimizer", "config", "rng"} <= set(payload)
    assert payload["epoch"] == 2 and payload["config"]["model"] == "sowa"
    assert not any(key.startswith("clipmodel.") for key in payload["sowa"])
    config = yaml.safe_load((save_path / "config.yaml").read_text())
    assert config["feature_map_idx"] == [5, 11, 17, 23] and config["quick_gelu"] is True
    assert config["window_size"] == 12 and config["lr"] == 1e-3 and config["img_size"] == 64
    first = load_checkpoint(save_path / "sowa_1.pth")["sowa"]
    key = "prompt_learner.ctx_pos"
    assert not torch.equal(first[key], payload["sowa"][key])


def test_k_shot_evaluation_writes_results(trained, capsys):
    data_root, save_path = trained
    argv = ["--model", "sowa", "--save_path", str(save_path), "--data_root", str(data_root)]
    argv += ["--device", "cpu", "--k_shot", "2", "--support_seed", "3", "--pro_variant", "sowa"]
    assert test_script.main(argv) == 0
    for suffix in ("json", "csv", "md"):
        assert (save_path / f"results_Synthetic_2shot.{suffix}").is_file()
    meta = json.loads((save_path / "results_Synthetic_2shot.json").read_text())["meta"]
    assert meta["model"] == "sowa" and meta["k_shot"] == 2 and meta["support_seed"] == 3
    assert set(meta["support"]) == {"tile", "stripes", "dots"}
    assert all(
        len(paths) == 2 and all("/train/good/" in path for path in paths)
        for paths in meta["support"].values()
    )
    assert meta["smoothing"].startswith("gaussian sigma 4")
    printed = capsys.readouterr().out
    assert "| mean |" in printed and "I-AUROC" in printed


def test_resume_matches_an_uninterrupted_run(trained, tmp_path):
    data_root, full = trained
    resumed = tmp_path / "resumed"
    assert train_sowa.main(train_args(data_root, resumed, "--epochs", "1")) == 0
    assert train_sowa.main(train_args(data_root, resumed, "--epochs", "2")) == 0
    expected = load_checkpoint(full / "sowa.pth")
    got = load_checkpoint(resumed / "sowa.pth")
    assert got["epoch"] == 2
    for key, value in expected["sowa"].items():
        assert torch.equal(got["sowa"][key], value), key


def test_bad_settings_are_one_line_errors(trained, caplog):
    data_root, save_path = trained
    argv = train_args(data_root, save_path.parent / "bad", "--num_heads", "6")
    assert train_sowa.main(argv) == 2
    assert "--num_heads 6 must divide the vision width 64" in caplog.text
    argv = ["--save_path", str(save_path), "--data_root", str(data_root), "--k_shot", "-1"]
    assert test_script.main(argv) == 2
    assert "--k_shot -1 must be >= 0" in caplog.text
