"""Pinned outputs: every model's predictions, training losses and one optimizer step on fixed
weights, recorded before the one-interface redesign (issue 14) and kept as a regression guard.

The reference values in `pinned_outputs.pt` were computed by this file's `current()` on the
code of that time, with a description of the machine that computed them (`machine()`: CPU model
and capability, thread count, torch, open_clip, numpy and Python versions). They are compared bit
for bit on an identical machine and within `RTOL`/`ATOL` elsewhere, since float32 kernels and
their summation order differ between CPU models even of one capability; a record that lacks part
of today's description (written before it was this full) counts as another machine.
`PIN_WRITE=1 python -m pytest tests/models/test_pinned_outputs.py` records them anew (only after
a deliberate change of numbers, said in the commit).
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

import numpy
import open_clip
import torch

from models import backbone
from models.aaclip import AAClip, AAClipConfig
from models.aaclip_cross_attn import AAClipCrossAttn, AAClipCrossAttnConfig
from models.base import FrozenCLIPModel, MapExtrema, Stage
from models.feclip import FEClip, FEClipConfig
from models.sowa import SOWA, SOWAConfig
from utils.inference.predictor import AnomalyPredictor

PINNED = Path(__file__).with_name("pinned_outputs.pt")
NAMES = ["tile", "dots"]
# Off an identical machine. Stand-ins for another CPU, on one AVX2 machine (one thread instead
# of two, ATen's scalar kernels by ATEN_CPU_CAPABILITY=default, MKL's SSE4.2 paths), take float32
# sums in another order; through the tiny ViT's 24 blocks that moves maps and losses by up to
# 1.4e-5, and Adam's first step (lr·g/(|g|+eps): about ±lr where a gradient is within rounding of
# zero) moves the step sums by up to 1.7e-4 at a magnitude of 14. None used over 0.35 of this
# tolerance; one adapter weight moved by 1e-3 (seen in the step sums), FOCAL_SMOOTH doubled or
# FE-CLIP's focal gamma 2 -> 2.01 use 4 to 44 times it.
RTOL = 3e-5
ATOL = 1e-4


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's `model name`, else what `platform` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str | int]:
    """What decides the bits of a float computation here: CPU, threads and library versions."""
    return {
        "torch": str(torch.__version__),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "open_clip": open_clip.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def fill(model: torch.nn.Module, seed: int) -> None:
    """Seeded values for every trainable parameter, in name order (independent of init order)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if not name.startswith("clipmodel."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    mask = (torch.rand(2, 1, 64, 64, generator=generator) > 0.8).float()
    mask[1] = 0
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, :, 48:] = False
    return {
        "image": images,
        "mask": mask,
        "label": torch.tensor([1, 0]),
        "class_name": list(NAMES),
        "valid": valid,
    }


def step_sums(model: torch.nn.Module) -> torch.Tensor:
    """Per-parameter sums of the trainable weights, name order: `[P]` float64."""
    return torch.stack(
        [
            parameter.detach().double().sum()
            for name, parameter in sorted(model.named_parameters())
            if not name.startswith("clipmodel.")
        ]
    )


def train_step(model: FrozenCLIPModel, stage: Stage, data: dict) -> dict[str, torch.Tensor]:
    """One optimizer step of a stage on the batch, as `utils.engine.training.fit` takes it."""
    optimizer, _ = model.configure_optimizer(stage)
    model.train()
    losses = model.loss(model.forward_train(data, stage), data)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return losses


def aaclip_outputs(out: dict, data: dict) -> None:
    for variant, settings in {
        "default": {},
        "relu_per_image": {"relu": True, "surgery_attention": "per_image"},
    }.items():
        torch.manual_seed(0)
        config = AAClipConfig(text_lr=1e-3, **settings)
        model = AAClip(config, backbone.tiny_clip(64))
        fill(model, 10)
        for domain in ("Industrial", "Medical"):
            output = AnomalyPredictor(model, domain).predict(data["image"], NAMES)
            out[f"aaclip/{variant}/{domain}/map"] = output.anomaly_map
            out[f"aaclip/{variant}/{domain}/score"] = output.image_score
        model.use_text_adapter = False
        plain = model.predict(data["image"], NAMES, domain="Medical")  # as recorded
        out[f"aaclip/{variant}/plain_text/map"] = plain.anomaly_map
        model.use_text_adapter = True
        text, image = model.stages()
        model.prepare_stage(text, "Synthetic")
        for mode, cls_loss in (("last_level", False), ("sum_levels", True)):
            model.config = dataclasses.replace(config, stage1_loss=mode, stage1_cls_loss=cls_loss)
            model.trainable_parameters(text)
            model.train()
            loss = model.loss(model.forward_train(data, text), data)["loss"]
            out[f"aaclip/{variant}/stage1/{mode}"] = loss.detach()
        model.config = config
        train_step(model, text, data)
        out[f"aaclip/{variant}/stage1/step"] = step_sums(model)
        model.prepare_stage(image, "Synthetic")
        losses = train_step(model, image, data)
        out[f"aaclip/{variant}/stage2/loss"] = losses["loss"].detach()
        out[f"aaclip/{variant}/stage2/step"] = step_sums(model)


def cross_attention_outputs(out: dict, data: dict) -> None:
    for mode in ("none", "image", "both"):
        torch.manual_seed(0)
        config = AAClipCrossAttnConfig(
            cross_attn_heads=4, surgery_attention="per_image", cross_attn_at_test=mode, text_lr=1e-3
        )
        model = AAClipCrossAttn(config, backbone.tiny_clip(64))
        fill(model, 20)
        output = AnomalyPredictor(model).predict(data["image"], NAMES)
        out[f"cross/{mode}/map"] = output.anomaly_map
        out[f"cross/{mode}/score"] = output.image_score
    text, image = model.stages()
    model.prepare_stage(text, "Synthetic")
    losses = train_step(model, text, data)
    out["cross/stage1/loss"] = losses["loss"].detach()
    out["cross/stage1/step"] = step_sums(model)
    model.prepare_stage(image, "Synthetic")
    losses = train_step(model, image, data)
    out["cross/stage2/loss"] = losses["loss"].detach()
    out["cross/stage2/step"] = step_sums(model)


def feclip_outputs(out: dict, data: dict) -> None:
    for variant, settings in {
        # The loss settings of the time of the pin (since then the fork's are the defaults).
        "default": {"focal_alpha": None, "dice_smooth": 1.0},
        "abs_zero_sigma": {
            "lfs_agg": "abs",
            "lfs_pad": "zero",
            "smoothing_sigma": 2.0,
            "focal_alpha": 0.25,
            "dice_smooth": 1e-6,
        },
    }.items():
        torch.manual_seed(0)
        model = FEClip(FEClipConfig(**settings), backbone.tiny_clip(64, quick_gelu=True))
        fill(model, 30)
        predictor = AnomalyPredictor(model)
        output = predictor.predict(data["image"], NAMES)
        out[f"feclip/{variant}/map"] = output.anomaly_map
        out[f"feclip/{variant}/score"] = output.image_score
        masked = model.predict(data["image"], NAMES, valid_mask=data["valid"])  # letterboxed
        out[f"feclip/{variant}/masked_map"] = masked.anomaly_map
        out[f"feclip/{variant}/masked_score"] = masked.image_score
        losses = train_step(model, model.stages()[0], data)
        out[f"feclip/{variant}/loss"] = torch.stack(
            [losses["loss"], losses["cls"], losses["mask"]]
        ).detach()
        out[f"feclip/{variant}/step"] = step_sums(model)


def sowa_outputs(out: dict, data: dict) -> None:
    for variant, settings in {
        "default": {},
        "window4_mean": {
            "window_size": 3,
            "depth": 2,
            "stage_reduce": "mean",
            "memory_features": "adapted",
            "smooth_memory_map": True,
            "in_proj_bias": True,
            "patch_ln_post": True,
            "ce_on_probabilities": False,
        },
    }.items():
        torch.manual_seed(0)
        model = SOWA(SOWAConfig(**settings), backbone.tiny_clip(64, quick_gelu=True))
        fill(model, 40)
        output = AnomalyPredictor(model).predict(data["image"], NAMES)
        out[f"sowa/{variant}/map"] = output.anomaly_map
        out[f"sowa/{variant}/score"] = output.image_score
        support = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        predictor = AnomalyPredictor(model, k_shot=2)
        predictor.set_support(support)
        output = predictor.predict(data["image"], NAMES)
        out[f"sowa/{variant}/kshot_map"] = output.anomaly_map
        out[f"sowa/{variant}/kshot_table"] = torch.from_numpy(
            predictor.table_image_scores(
                MapExtrema.of(output.anomaly_map.numpy()), output.image_score.numpy()
            )
        )
        torch.manual_seed(5)  # attention dropout
        losses = train_step(model, model.stages()[0], data)
        out[f"sowa/{variant}/loss"] = torch.stack(
            [losses["loss"], losses["ce"], losses["seg"]]
        ).detach()
        out[f"sowa/{variant}/step"] = step_sums(model)


def current() -> dict[str, torch.Tensor]:
    data = batch()
    out: dict[str, torch.Tensor] = {}
    aaclip_outputs(out, data)
    cross_attention_outputs(out, data)
    feclip_outputs(out, data)
    sowa_outputs(out, data)
    # Every third pixel of each map keeps the file small and still covers every region.
    return {
        key: value[..., ::3, ::3].contiguous() if key.endswith("map") else value
        for key, value in out.items()
    }


def mismatch(got: torch.Tensor, expected: torch.Tensor, exact: bool) -> str | None:
    """None when `got` matches `expected`, bit for bit when `exact`, else within `RTOL`/`ATOL`;
    otherwise how it differs."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"{tuple(got.shape)} {got.dtype}, pinned {tuple(expected.shape)} {expected.dtype}"
    if torch.equal(got, expected):
        return None
    if not exact and torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
        return None
    difference = (got.double() - expected.double()).abs()
    relative = difference / expected.double().abs()
    return f"max |diff| {difference.max():.3g}, max |diff|/|pinned| {relative.max():.3g}"


def test_outputs_equal_the_pinned_values() -> None:
    got = current()
    if os.environ.get("PIN_WRITE"):
        torch.save({"machine": machine(), "outputs": got}, PINNED)
    pinned = torch.load(PINNED, weights_only=True)
    expected = pinned["outputs"]
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.isfinite(value).all(), key
    here = machine()
    exact = pinned["machine"] == here
    failed = {
        key: message
        for key, value in expected.items()
        if (message := mismatch(got[key], value, exact)) is not None
    }
    how = (
        "bit for bit (this machine is identical to the recording one)"
        if exact
        else f"within rtol={RTOL}, atol={ATOL} (this machine differs from the recording one)"
    )
    assert not failed, "\n".join(
        [f"{len(failed)} of {len(expected)} outputs differ, compared {how}"]
        + [f"{key}: {message}" for key, message in failed.items()]
        + [f"recording machine: {pinned['machine']}", f"this machine:      {here}"]
    )
