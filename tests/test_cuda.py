"""CUDA paths, where a CUDA device exists (skipped elsewhere; benchmarks/device.sh runs them):
each model predicts on the GPU as on the CPU, trains a step there, and `--amp auto` is bf16."""

from __future__ import annotations

import math

import pytest
import torch

from models.backbone import tiny_clip
from models.registry import MODELS, model_class
from utils.core.runtime import grad_scaler, resolve_amp
from utils.engine.training import StageForward, training_step
from utils.inference.predictor import AnomalyPredictor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def build(name: str, device: torch.device):
    cls = model_class(name)
    torch.manual_seed(0)
    return cls(cls.config_class(), tiny_clip(img_size=64)).to(device).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_predictions_on_cuda_equal_the_cpus(name):
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = AnomalyPredictor(build(name, torch.device("cpu"))).predict(images, ["tile"] * 4)
    got = AnomalyPredictor(build(name, CUDA)).predict(images, ["tile"] * 4)
    span = float(expected.anomaly_map.max() - expected.anomaly_map.min())
    torch.testing.assert_close(
        got.anomaly_map.cpu(), expected.anomaly_map, atol=1e-3 * span, rtol=0
    )
    torch.testing.assert_close(got.image_score.cpu(), expected.image_score, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_a_training_step_on_cuda_is_finite(name, amp):
    model = build(name, CUDA)
    stage = model.stages()[-1]
    model.prepare_stage(stage, "Synthetic")
    optimizer, _ = model.configure_optimizer(stage)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(4, 3, 64, 64, generator=generator).to(CUDA),
        "mask": (torch.rand(4, 1, 64, 64, generator=generator) > 0.9).float().to(CUDA),
        "label": torch.tensor([0, 1, 0, 1], device=CUDA),
        "class_name": ["tile"] * 4,
    }
    model.train()
    scaler = grad_scaler(CUDA, amp)
    losses = training_step(StageForward(model, stage), model, batch, optimizer, scaler, amp)
    assert losses and all(math.isfinite(value) for value in losses.values())


def test_amp_auto_is_bf16_on_a_gpu_that_has_it():
    assert resolve_amp("auto", CUDA) == ("bf16" if torch.cuda.is_bf16_supported() else "none")
