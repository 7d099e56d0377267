"""The three commands of the cross-attention workflow end to end on the tiny backbone:
train the base, fine-tune with cross-attention from it, evaluate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import test as test_script
import train
import train_cross_attention
from utils.core.checkpoint import load_checkpoint, save_checkpoint

BASE = [
    "--text_epoch",
    "1",
    "--image_epoch",
    "1",
    "--text_batch_size",
    "8",
    "--image_batch_size",
    "8",
    "--shot",
    "8",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, synthetic_root):
    data_root = tmp_path_factory.mktemp("cross") / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    save_path = data_root.parent / "base"
    assert train.main(["--data_root", str(data_root), "--save_path", str(save_path), *BASE]) == 0
    return data_root, save_path


def fine_tune_args(base, save_path, *extra):
    return [
        "--save_path",
        str(save_path),
        "--load_base_text_adapter",
        str(base / "text_adapter.pth"),
        "--load_base_image_adapter",
        str(base / "image_adapter.pth"),
        "--device",
        "cpu",
        *extra,
    ]


def test_fine_tune_from_base_then_evaluate(base_run, tmp_path, caplog):
    data_root, base = base_run
    run = tmp_path / "cross"
    argv = ["--model", "aaclip_cross_attn", *fine_tune_args(base, run, "--image_epoch", "2")]
    assert train.main(argv) == 0  # train.py hands --model aaclip_cross_attn over
    names = {path.name for path in run.iterdir()}
    assert {
        "text_adapter_cross_attn.pth",
        "image_adapter_cross_attn.pth",
        "image_adapter_cross_attn_1.pth",
        "image_adapter_cross_attn_2.pth",
        "train_cross_attention.log",
    } <= names
    text = load_checkpoint(run / "text_adapter_cross_attn.pth")
    assert {"text_adapter", "text_cross_attn", "text_cross_attn_gate", "text_optimizer"} <= set(
        text
    )
    image = load_checkpoint(run / "image_adapter_cross_attn.pth")
    assert {"image_adapter", "image_cross_attn", "image_scheduler", "config", "rng"} <= set(image)
    assert image["image_cross_attn_gate"] != 0  # the gate opened during training
    # Settings not given come from the base run; the one given wins.
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["shot"] == 8 and config["text_epoch"] == 1 and config["image_epoch"] == 2
    assert config["data_root"] == str(data_root)
    log = (run / "train_cross_attention.log").read_text()
    assert "weight check: base image_adapter after epoch 1 of 1" in log

    assert test_script.main(["--save_path", str(run), "--data_root", str(data_root)]) == 0
    results = json.loads((run / "results_Synthetic.json").read_text())
    assert results["meta"]["model"] == "aaclip_cross_attn"
    assert results["meta"]["cross_attn_at_test"] == "image"


def test_rerun_resumes_instead_of_retraining(base_run, tmp_path, caplog):
    _, base = base_run
    run = tmp_path / "cross"
    assert train_cross_attention.main(fine_tune_args(base, run)) == 0
    before = load_checkpoint(run / "image_adapter_cross_attn.pth")
    assert train_cross_attention.main(fine_tune_args(base, run)) == 0
    after = load_checkpoint(run / "image_adapter_cross_attn.pth")
    assert "resuming image stage" in caplog.text
    for key, value in before["image_cross_attn"].items():
        assert torch.equal(value, after["image_cross_attn"][key])


def original_format(path, payload, tmp_path, name):
    """A checkpoint as the original AA-CLIP code writes it: weights, optimizer, epoch, no config."""
    original = {key: value for key, value in load_checkpoint(path).items() if key in payload}
    save_checkpoint(tmp_path / name, original)
    return tmp_path / name


def test_original_aaclip_base_checkpoints_load(base_run, tmp_path):
    _, base = base_run
    text = original_format(
        base / "text_adapter.pth", {"epoch", "text_adapter", "text_optimizer"}, tmp_path, "t.pth"
    )
    image = original_format(
        base / "image_adapter.pth", {"epoch", "image_adapter", "image_optimizer"}, tmp_path, "i.pth"
    )
    argv = [
        "--save_path",
        str(tmp_path / "run"),
        "--load_base_text_adapter",
        str(text),
        "--load_base_image_adapter",
        str(image),
        "--device",
        "cpu",
        *BASE,
    ]
    assert train_cross_attention.main(argv) == 0
    assert (tmp_path / "run" / "image_adapter_cross_attn.pth").is_file()


def test_relu_mismatch_and_missing_file_are_one_line_errors(base_run, tmp_path, caplog):
    _, base = base_run
    payload = load_checkpoint(base / "image_adapter.pth")
    relu_state = {
        key.replace(".fc.weight", ".fc.0.weight")
        if key.startswith(("seg_proj", "det_proj"))
        else key: value
        for key, value in payload["image_adapter"].items()
    }
    save_checkpoint(tmp_path / "relu.pth", {"epoch": 1, "image_adapter": relu_state})
    argv = [
        "--save_path",
        str(tmp_path / "a"),
        "--load_base_image_adapter",
        str(tmp_path / "relu.pth"),
    ]
    assert train_cross_attention.main([*argv, *BASE]) == 2
    assert "pass --relu" in caplog.records[-1].getMessage()
    missing = ["--save_path", str(tmp_path / "b"), "--load_base_text_adapter", "nope.pth"]
    assert train_cross_attention.main([*missing, *BASE]) == 2
    message = caplog.records[-1].getMessage()
    assert "nope.pth does not exist" in message and "\n" not in message
    assert not (tmp_path / "b" / "text_adapter_cross_attn.pth").exists()
