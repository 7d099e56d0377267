"""A checkpoint alone rebuilds its model: each of the four models, trained with non-default
architecture settings, evaluates (test.py) and deploys (predict.py) with no model flags; only
test-time settings may be changed there, each model's own YAML is accepted, and the domain
travels from the training data set into the calibration file."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

import predict
import test as test_script
import train
from datasets.catalog import CATALOG
from models.registry import MODELS, find_checkpoint
from utils.core.config import CONFIG_DIR
from utils.deploy import calibration as calib
from utils.engine import job
from utils.inference.source import training_domain

FAST = ["--device", "cpu", "--training_mode", "few_shot", "--shot", "4"]
# Non-default architecture per model (the defect: AA-CLIP was rebuilt from test.py's flags).
RUNS = {
    "aaclip": [
        "--image_adapt_weight", "0.2", "--relu", "--text_adapt_until", "2",
        "--text_epoch", "1", "--image_epoch", "1", "--text_batch_size", "4",
        "--image_batch_size", "4",
    ],
    "feclip": [
        "--model", "feclip", "--tap_indices", "5", "11", "17", "23", "--lambda_fuse", "0.2",
        "--lfs_agg", "abs", "--epochs", "1", "--batch_size", "4",
    ],
    "sowa": [
        "--model", "sowa", "--window_size", "4", "--depth", "2", "--prompt_length", "6",
        "--in_proj_bias", "--epochs", "1", "--batch_size", "4",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_root):
    """One short run per model (cross-attention fine-tuned from the AA-CLIP one)."""
    data_root = tmp_path_factory.mktemp("flags") / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    folders = {}
    for name, extra in RUNS.items():
        folders[name] = data_root.parent / name
        argv = ["--data_root", str(data_root), "--save_path", str(folders[name]), *FAST, *extra]
        assert train.main(argv) == 0
    base = folders["aaclip"]
    folders["aaclip_cross_attn"] = data_root.parent / "cross"
    argv = [
        "--model", "aaclip_cross_attn", "--save_path", str(folders["aaclip_cross_attn"]),
        "--load_base_text_adapter", str(base / "text_adapter.pth"),
        "--load_base_image_adapter", str(base / "image_adapter.pth"),
        "--cross_attn_heads", "4", "--cross_attn_init", "xavier", "--device", "cpu",
    ]  # fmt: skip
    assert train.main(argv) == 0
    return data_root, folders


@pytest.mark.parametrize("name", ["aaclip", "aaclip_cross_attn", "feclip", "sowa"])
def test_evaluation_and_deployment_need_no_model_flags(runs, name, tmp_path):
    data_root, folders = runs
    run = folders[name]
    argv = ["--save_path", str(run), "--data_root", str(data_root), "--device", "cpu"]
    assert test_script.main([*argv, "--results_dir", str(tmp_path / "eval")]) == 0
    meta = json.loads((tmp_path / "eval" / "results_Synthetic.json").read_text())["meta"]
    assert meta["model"] == name
    stored = json.loads(json.dumps(meta["model_settings"]))
    if name == "aaclip":
        assert stored["image_adapt_weight"] == 0.2 and stored["relu"] is True
    if name == "feclip":
        assert stored["block_indices"] == [5, 11, 17, 23] and stored["lfs_agg"] == "abs"

    normal = data_root / "tile" / "train" / "good"
    calibration = tmp_path / "calibration.json"
    common = ["--checkpoint", str(run), "--device", "cpu"]
    argv = ["calibrate", *common, "--normal_dir", str(normal), "--output", str(calibration)]
    assert predict.main(argv) == 0
    assert calib.load_calibration(calibration)["model"]["name"] == name
    argv = ["score", *common, "--input", str(data_root / "tile" / "test"), "--out", str(tmp_path)]
    assert predict.main([*argv, "--calibration", str(calibration), "--no_overlays"]) == 0
    assert (tmp_path / "scores.csv").is_file()


def test_each_models_yaml_and_test_time_settings_reach_the_model(runs, tmp_path):
    data_root, folders = runs
    common = ["--data_root", str(data_root), "--device", "cpu", "--results_dir", str(tmp_path)]

    def meta(name, *extra):
        assert test_script.main(["--save_path", str(folders[name]), *common, *extra]) == 0
        return json.loads((tmp_path / "results_Synthetic.json").read_text())["meta"]

    assert meta("feclip", "--config", str(CONFIG_DIR / "feclip.yaml"))["model"] == "feclip"
    feclip = meta("feclip", "--smoothing_sigma", "2")
    assert feclip["smoothing_sigma"] == 2.0 and feclip["smoothing"].startswith("gaussian sigma 2")
    sowa = meta(
        "sowa", "--stage_reduce", "mean", "--memory_features", "adapted", "--smooth_memory_map"
    )
    assert (sowa["stage_reduce"], sowa["memory_features"], sowa["smooth_memory_map"]) == (
        "mean",
        "adapted",
        True,
    )
    assert "mean of stage maps" in sowa["smoothing"]
    assert meta("aaclip_cross_attn", "--cross_attn_at_test", "none")["cross_attn_at_test"] == "none"


def test_an_architecture_flag_that_differs_is_one_line_naming_it(runs, caplog, one_line_error):
    data_root, folders = runs
    argv = ["--save_path", str(folders["feclip"]), "--data_root", str(data_root), "--device", "cpu"]
    assert test_script.main([*argv, "--lambda_fuse", "0.5"]) == 2
    assert "pass --lambda_fuse 0.2" in one_line_error()
    caplog.clear()
    assert test_script.main([*argv, "--config", str(CONFIG_DIR / "sowa.yaml")]) == 2
    assert "holds no sowa.pth" in one_line_error()  # the YAML's model: sowa


def test_the_domain_is_the_training_sets_and_travels_in_the_calibration(runs, tmp_path):
    data_root, folders = runs
    normal = data_root / "tile" / "train" / "good"
    thresholds = {}
    for domain in (None, "Medical"):
        output = tmp_path / f"{domain}.json"
        argv = ["calibrate", "--checkpoint", str(folders["aaclip"]), "--normal_dir", str(normal)]
        argv += ["--device", "cpu", "--output", str(output)]
        assert predict.main(argv + (["--domain", domain] if domain else [])) == 0
        calibration = calib.load_calibration(output)
        assert calibration["domain"] == (domain or "Industrial")
        thresholds[domain] = calibration["thresholds"]["max"]
    assert thresholds[None] != thresholds["Medical"]  # the medical blur reached the maps
    assert training_domain({"config": {"dataset": "Liver"}}) == "Medical"
    assert training_domain({"config": {"dataset": "MVTec"}}) == "Industrial"


def test_every_checkpoint_kind_loads_without_pickle(runs):
    _, folders = runs
    files = [path for folder in folders.values() for path in folder.glob("*.pth")]
    stems = {path.stem.rstrip("_0123456789") for path in files}
    assert stems == {
        "text_adapter",
        "image_adapter",
        "text_adapter_cross_attn",
        "image_adapter_cross_attn",
        "feclip",
        "feclip_best",  # its kept lowest-loss epoch
        "sowa",
    }
    for path in files:
        torch.load(path, weights_only=True)


def test_a_checkpoint_that_needs_pickle_is_refused_unless_trusted(runs, tmp_path, one_line_error):
    data_root, folders = runs
    run = tmp_path / "run"
    shutil.copytree(folders["feclip"], run)
    evaluated = find_checkpoint(run)[1]
    payload = torch.load(evaluated, weights_only=True)
    payload["calibration_curve"] = np.arange(3)  # a numpy array: only pickle loads it
    torch.save(payload, evaluated)
    argv = ["--save_path", str(run), "--data_root", str(data_root), "--device", "cpu"]
    assert test_script.main(argv) == 2
    assert "pass --trust_checkpoint if you trust its source" in one_line_error()
    assert test_script.main([*argv, "--trust_checkpoint"]) == 0


@pytest.mark.parametrize("script", ["train", "train_cross_attention", "test", "calibrate", "score"])
def test_every_scripts_help_names_every_model_data_set_and_default(script):
    if script in ("calibrate", "score"):
        parser = predict.build_parser(script)
    elif script == "test":
        parser = test_script.build_parser()
    else:
        model = "aaclip_cross_attn" if script == "train_cross_attention" else "aaclip"
        parser = job.build_parser(MODELS[model])
    text = " ".join(parser.format_help().split())
    for model in MODELS:
        assert model in text
    if script not in ("calibrate", "score"):
        for dataset in CATALOG:
            assert dataset in text, dataset
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"--{action.dest} has no help"
        assert (
            "default" in action.help
            or action.default is argparse.SUPPRESS
            or (f"(default: {action.default}" in text)
        ), action.dest
