"""Pinned outputs: every model's predictions, training losses and one optimizer step on fixed
weights, recorded before the one-interface redesign (issue 14) and kept as a regression guard.

The reference values in `pinned_outputs.pt` were computed by this file's `current()` on the
code of that time; they are compared bit for bit on the machine kind that recorded them (same
torch version, CPU capability and thread count) and to float tolerance elsewhere, since matrix
kernels differ between CPU kinds. `PIN_WRITE=1 python -m pytest tests/models/test_pinned_outputs.py`
records them anew (only after a deliberate change of numbers, said in the commit).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.testing import assert_close

import train
import train_feclip
import train_sowa
from models import backbone
from models.aaclip import AdaptedCLIP
from models.cross_attention import AdaptedCLIPWithCrossAttention
from models.feclip import FECLIP
from models.sowa import SOWA
from train_cross_attention import set_trainable, stage_optimizer
from utils.forward_utils import (
    calculate_seg_loss,
    calculate_similarity_map,
    get_adapted_text_embedding,
)

PINNED = Path(__file__).with_name("pinned_outputs.pt")
NAMES = ["tile", "dots"]


def machine() -> dict:
    return {
        "torch": str(torch.__version__),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
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
    return {"image": images, "mask": mask, "label": torch.tensor([1, 0]), "valid": valid}


def step_sums(model: torch.nn.Module) -> torch.Tensor:
    """Per-parameter sums of the trainable weights, name order: `[P]` float64."""
    return torch.stack(
        [
            parameter.detach().double().sum()
            for name, parameter in sorted(model.named_parameters())
            if not name.startswith("clipmodel.")
        ]
    )


def aaclip_args(**extra) -> argparse.Namespace:
    settings = {
        "dataset": "Synthetic",
        "img_size": 64,
        "stage1_loss": "last_level",
        "stage1_cls_loss": False,
        "text_norm_weight": 0.1,
        "cls_logit_scale": 1.0,
    }
    return argparse.Namespace(**{**settings, **extra})


def stage1_loss_of(model, data, args, contexts=None) -> torch.Tensor:
    """train.train_text_adapter's loss on one batch (old API)."""
    patch_features, cls = model.surgery_features(data["image"])
    unique = list(dict.fromkeys(NAMES))
    context_list = contexts(patch_features, NAMES, unique) if contexts else None
    anchors = train.TextAnchors(model, args.dataset)(unique, context_list)
    epoch_text_feature = anchors[[unique.index(name) for name in NAMES]].float()
    if args.stage1_loss == "last_level" and not args.stage1_cls_loss:
        patch_features = patch_features[-1:]
    maps = [calculate_similarity_map(f, epoch_text_feature, 64) for f in patch_features]
    loss = train.stage1_loss(
        maps, data["mask"], epoch_text_feature, args.text_norm_weight, args.stage1_loss
    )
    if args.stage1_cls_loss:
        logits = train.class_logits(cls.float(), epoch_text_feature, args.cls_logit_scale)
        loss = loss + torch.nn.functional.cross_entropy(logits, data["label"])
    return loss


def stage2_loss_of(model, data, args, extra=None) -> torch.Tensor:
    """train.train_image_adapter's loss on one batch (old API)."""
    text_embeddings = get_adapted_text_embedding(model, args.dataset, "cpu")
    epoch_text_feature = torch.stack([text_embeddings[name] for name in NAMES])
    seg_tokens, det_token = model(data["image"], **(extra or {}))
    logits = train.class_logits(det_token.float(), epoch_text_feature, args.cls_logit_scale)
    loss = torch.nn.functional.cross_entropy(logits, data["label"])
    for tokens in seg_tokens:
        level_map = calculate_similarity_map(tokens, epoch_text_feature, 64)
        loss = loss + calculate_seg_loss(level_map, data["mask"])
    return loss


def aaclip_outputs(out: dict, data: dict) -> None:
    for variant, settings in {
        "default": {},
        "relu_per_image": {"relu": True, "surgery_attention": "per_image"},
    }.items():
        torch.manual_seed(0)
        model = AdaptedCLIP(backbone.tiny_clip(64), **settings)
        fill(model, 10)
        model.eval()
        for domain in ("Industrial", "Medical"):
            model.domain = domain
            model.set_class_text_features({})
            output = model.predict(data["image"], NAMES)
            out[f"aaclip/{variant}/{domain}/map"] = output.anomaly_map
            out[f"aaclip/{variant}/{domain}/score"] = output.image_score
        model.use_text_adapter = False
        model.set_class_text_features({})
        out[f"aaclip/{variant}/plain_text/map"] = model.predict(data["image"], NAMES).anomaly_map
        model.use_text_adapter = True
        args = aaclip_args(surgery_attention=settings.get("surgery_attention", "batch_mix"))
        for mode, cls_loss in (("last_level", False), ("sum_levels", True)):
            args.stage1_loss, args.stage1_cls_loss = mode, cls_loss
            train.trainable(model, "text_adapter")
            loss = stage1_loss_of(model, data, args)
            out[f"aaclip/{variant}/stage1/{mode}"] = loss.detach()
        train.trainable(model, "text_adapter")
        optimizer = torch.optim.Adam(model.text_adapter.parameters(), lr=1e-3, betas=(0.5, 0.999))
        args.stage1_loss, args.stage1_cls_loss = "last_level", False
        stage1_loss_of(model, data, args).backward()
        optimizer.step()
        out[f"aaclip/{variant}/stage1/step"] = step_sums(model)
        model.eval()
        train.trainable(model, "image_adapter")
        optimizer = torch.optim.Adam(model.image_adapter.parameters(), lr=5e-4, betas=(0.5, 0.999))
        loss = stage2_loss_of(model, data, args)
        out[f"aaclip/{variant}/stage2/loss"] = loss.detach()
        loss.backward()
        optimizer.step()
        out[f"aaclip/{variant}/stage2/step"] = step_sums(model)


def cross_attention_outputs(out: dict, data: dict) -> None:
    torch.manual_seed(0)
    model = AdaptedCLIPWithCrossAttention(
        backbone.tiny_clip(64), cross_attn_heads=4, surgery_attention="per_image"
    )
    fill(model, 20)
    model.eval()
    for mode in ("none", "image", "both"):
        model.cross_attn_at_test = mode
        model.set_class_text_features({})
        model.class_text_contexts.clear()
        output = model.predict(data["image"], NAMES)
        out[f"cross/{mode}/map"] = output.anomaly_map
        out[f"cross/{mode}/score"] = output.image_score
    args = aaclip_args()

    def contexts(level_features, class_names, unique):
        return [level_features[0]] * len(unique)

    set_trainable(model, "text")
    optimizer = stage_optimizer(model, "text", 1e-3, [0.5, 0.999])
    loss = stage1_loss_of(model, data, args, contexts)
    out["cross/stage1/loss"] = loss.detach()
    loss.backward()
    optimizer.step()
    out["cross/stage1/step"] = step_sums(model)
    model.eval()
    model.class_text_contexts.clear()
    set_trainable(model, "image")
    optimizer = stage_optimizer(model, "image", 5e-4, [0.5, 0.999])
    context, mask = model.text_contexts(NAMES)
    loss = stage2_loss_of(model, data, args, {"text_context": context, "text_key_mask": mask})
    out["cross/stage2/loss"] = loss.detach()
    loss.backward()
    optimizer.step()
    out["cross/stage2/step"] = step_sums(model)


def feclip_outputs(out: dict, data: dict) -> None:
    for variant, settings in {
        "default": {},
        "abs_zero_sigma": {"lfs_agg": "abs", "lfs_pad": "zero", "smoothing_sigma": 2.0},
    }.items():
        torch.manual_seed(0)
        model = FECLIP(backbone.tiny_clip(64, quick_gelu=True), **settings)
        fill(model, 30)
        model.eval()
        output = model.predict(data["image"], NAMES)
        out[f"feclip/{variant}/map"] = output.anomaly_map
        out[f"feclip/{variant}/score"] = output.image_score
        masked = model.predict(data["image"], NAMES, valid_mask=data["valid"])
        out[f"feclip/{variant}/masked_map"] = masked.anomaly_map
        out[f"feclip/{variant}/masked_score"] = masked.image_score
        args = argparse.Namespace(
            w_cls=1.0,
            w_mask=1.0,
            focal_gamma=2.0,
            focal_alpha=0.25 if settings else None,
            dice_smooth=1e-6 if settings else 1.0,
            lr=5e-4,
            fc_patch_lr_ratio=0.01,
        )
        optimizer = train_feclip.build_optimizer(model, args)
        model.train()
        loss, cls_loss, mask_loss = train_feclip.feclip_loss(
            model(data["image"]), data["mask"], data["label"], args
        )
        out[f"feclip/{variant}/loss"] = torch.stack([loss, cls_loss, mask_loss]).detach()
        loss.backward()
        optimizer.step()
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
        },
    }.items():
        torch.manual_seed(0)
        model = SOWA(backbone.tiny_clip(64, quick_gelu=True), **settings)
        fill(model, 40)
        model.eval()
        output = model.predict(data["image"], NAMES)
        out[f"sowa/{variant}/map"] = output.anomaly_map
        out[f"sowa/{variant}/score"] = output.image_score
        support = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        model.set_memory(support)
        output = model.predict(data["image"], NAMES)
        out[f"sowa/{variant}/kshot_map"] = output.anomaly_map
        out[f"sowa/{variant}/kshot_table"] = torch.from_numpy(
            model.table_image_scores(output.anomaly_map.numpy(), output.image_score.numpy(), "")
        )
        model.set_memory(None)
        args = argparse.Namespace(lr=1e-3, weight_decay=0.2)
        optimizer = train_sowa.build_optimizer(model, args)
        model.train()
        torch.manual_seed(5)  # attention dropout
        loss, ce_loss, seg_loss = train_sowa.sowa_loss(
            model(data["image"]), data["mask"], data["label"], bool(not settings)
        )
        out[f"sowa/{variant}/loss"] = torch.stack([loss, ce_loss, seg_loss]).detach()
        loss.backward()
        optimizer.step()
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


def test_outputs_equal_the_pinned_values():
    got = current()
    if os.environ.get("PIN_WRITE"):
        torch.save({"machine": machine(), "outputs": got}, PINNED)
    pinned = torch.load(PINNED, weights_only=True)
    expected = pinned["outputs"]
    assert sorted(got) == sorted(expected)
    exact = pinned["machine"] == machine()
    for key, value in expected.items():
        assert torch.isfinite(value).all(), key
        if exact:
            assert torch.equal(got[key], value), key
        else:
            assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
