"""bf16 autocast on CPU: runs in training and stays within the documented tolerance of fp32.

Documented tolerance (README, Performance): maps within 5% of the map's range, image scores
within 0.01, pixel AUROC within 0.01 of fp32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import predict
import test as test_script
import train
from datasets.anomaly import build_test_datasets
from datasets.catalog import prompt_names
from datasets.items import collate_items
from datasets.metadata import load_test_records
from datasets.preprocessing import Preprocessing
from models.aaclip import AAClip
from models.forward_utils import get_adapted_text_embedding
from utils.core import runtime
from utils.core.runtime import autocast, resolve_amp
from utils.deploy import calibration as calib
from utils.evaluation.metrics import pixel_metrics


def test_bf16_predictions_stay_close_to_fp32(tiny_clip, synthetic_root):
    model = AAClip(None, tiny_clip).eval()
    anchors = get_adapted_text_embedding(model, prompt_names("Synthetic"), "cpu")
    datasets = build_test_datasets(
        load_test_records("Synthetic", synthetic_root), synthetic_root, Preprocessing(64)
    )
    for dataset in datasets.values():
        batch = collate_items([dataset[index] for index in range(len(dataset))])
        names = [item.class_name for item in batch.items]
        reference = model.predict(batch.images, names, text=anchors)
        with autocast(torch.device("cpu"), "bf16"):
            reduced = model.predict(batch.images, names, text=anchors)
        assert reduced.anomaly_map.dtype == torch.float32
        span = reference.anomaly_map.max() - reference.anomaly_map.min()
        assert (reduced.anomaly_map - reference.anomaly_map).abs().max() <= 0.05 * span
        assert (reduced.image_score - reference.image_score).abs().max() <= 0.01
        masks = torch.stack([item.mask[0] for item in batch.items]).bool().numpy()
        auroc_fp32 = pixel_metrics(reference.anomaly_map.numpy(), masks)["auroc"]
        auroc_bf16 = pixel_metrics(reduced.anomaly_map.numpy(), masks)["auroc"]
        assert abs(auroc_fp32 - auroc_bf16) <= 0.01


def test_training_runs_under_bf16(synthetic_root, tmp_path):
    data_root = tmp_path / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    argv = [
        "--data_root",
        str(data_root),
        "--save_path",
        str(tmp_path / "run"),
        "--amp",
        "bf16",
        "--device",
        "cpu",
        "--shot",
        "2",  # one normal and one anomalous image per class: one step per stage
        "--text_epoch",
        "1",
        "--image_epoch",
        "1",
        "--text_batch_size",
        "6",
        "--image_batch_size",
        "6",
    ]
    assert train.main(argv) == 0
    assert (tmp_path / "run" / "image_adapter.pth").is_file()


@pytest.mark.parametrize(("bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "none")])  # fmt: skip
def test_amp_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, caplog, bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(runtime, "_WARNED_AMP", set())  # as in a fresh process
    assert resolve_amp("auto", torch.device("cpu")) == expected
    assert resolve_amp("none", torch.device("cpu")) == "none"
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16"  # asked for: kept
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16"
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    if expected == "none":  # an explicit bf16 on an emulating CPU warns, once per process
        (warning,) = warnings
        assert "slower than fp32" in warning.getMessage() and "--amp auto" in warning.getMessage()
    else:
        assert not warnings


def test_amp_auto_reaches_training_evaluation_and_deployment(synthetic_root, tmp_path, monkeypatch):
    """With no native bf16 (patched, whatever this CPU has), auto trains, evaluates and
    calibrates in fp32, and the files say so."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    data_root = tmp_path / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    run = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--save_path", str(run), "--device", "cpu"]
    fast = ["--shot", "2", "--text_epoch", "1", "--image_epoch", "1", "--amp", "auto"]
    assert train.main([*argv, *fast]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["amp"] == "none"
    assert test_script.main([*argv, "--amp", "auto"]) == 0
    meta = json.loads((run / "results_Synthetic.json").read_text())["meta"]
    assert meta["amp"] == "none"
    normal = str(data_root / "tile" / "train" / "good")
    calibrate = ["calibrate", "--checkpoint", str(run), "--normal_dir", normal, "--amp", "auto"]
    assert predict.main([*calibrate, "--device", "cpu"]) == 0
    assert calib.load_calibration(run / "calibration.json")["amp"] == "none"
