"""FE-CLIP on the tiny backbone: DCT maths, FFE/LFS adapters, walker equivalence, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from datasets.anomaly import TrainDataset
from datasets.metadata import ensure_training_records
from datasets.preprocessing import Preprocessing
from models import backbone
from models.feclip import (
    FEClip,
    FEClipConfig,
    FFEAdapter,
    LFSAdapter,
    TapLogits,
    dct2,
    dct_basis,
    idct2,
)
from models.forward_utils import binary_focal_loss, token_valid_mask
from utils.core.checkpoint import save_checkpoint
from utils.core.errors import CheckpointError, DataError

TAPS = [5, 11, 17, 23]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_dct_basis_is_orthonormal_and_idct_inverts_dct(n):
    basis = dct_basis(n)
    assert_close(basis @ basis.T, torch.eye(n), atol=1e-6, rtol=0)
    windows = torch.randn(4, 7, n, n, 6)
    coefficients = dct2(windows, basis)
    assert_close(idct2(coefficients, basis), windows, atol=1e-5, rtol=0)
    assert_close(coefficients.square().sum(), windows.square().sum())  # Parseval
    # Coefficient [0, 0] of a window is its sum / n (the DC term).
    assert_close(coefficients[..., 0, 0, :], windows.sum(dim=(2, 3)) / n)


def test_dct_column_sums_match_the_spec():
    assert_close(dct_basis(3).sum(0), torch.tensor([1.6927, -0.2391, 0.2785]), atol=1e-4, rtol=0)


def test_ffe_pads_and_crops_a_grid_the_window_does_not_divide():
    torch.manual_seed(0)
    ffe = FFEAdapter(width=16, window=3)
    grid = torch.randn(2, 8, 8, 16)  # the tiny backbone's 8 x 8 grid, P = 3
    out = ffe(grid)
    assert out.shape == grid.shape
    padded = F.pad(grid.permute(0, 3, 1, 2), (0, 1, 0, 1), mode="replicate").permute(0, 2, 3, 1)
    assert_close(out, ffe(padded)[:, :8, :8])
    # Windows are independent: changing one window changes only its own tokens.
    changed = grid.clone()
    changed[:, :3, :3] += 1.0
    difference = (ffe(changed) - out).abs().sum(dim=(0, 3))
    assert difference[:3, :3].min() > 0
    difference[:3, :3] = 0
    assert difference.max() == 0


def explicit_window_mean(lfs: LFSAdapter, grid: torch.Tensor, mask=None) -> torch.Tensor:
    """LFS by its definition, one token at a time: the token's Q x Q window (border padded
    as the adapter pads it), letterbox tokens zeroed and the window rescaled by Q² / its valid
    neighbours, through an explicit 2-D DCT, coefficients averaged. -> `[B, D, H, W]`."""
    q, r = lfs.window, lfs.window // 2
    x = grid.permute(0, 3, 1, 2)  # [B, D, H, W]
    valid = torch.ones_like(x[:, :1]) if mask is None else mask[:, None].float()

    def pad(t, value):
        if lfs.pad == "replicate":
            return F.pad(t, (r, r, r, r), mode="replicate")
        return F.pad(t, (r, r, r, r), value=value)

    values, validity = pad(x * valid, 0.0), pad(valid, 1.0)
    out = torch.zeros_like(x)
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            window = values[:, :, i : i + q, j : j + q].permute(0, 2, 3, 1)  # [B, Q, Q, D]
            statistic = dct2(window, lfs.basis).mean(dim=(1, 2))  # [B, D]
            if mask is not None:
                count = validity[:, 0, i : i + q, j : j + q].sum(dim=(1, 2)).clamp(min=1)
                statistic = statistic * (q * q / count)[:, None]
            out[:, :, i, j] = statistic
    return out


@pytest.mark.parametrize("pad", ["replicate", "zero"])
def test_lfs_mean_as_a_kernel_equals_the_explicit_window_dct(pad):
    torch.manual_seed(0)
    lfs = LFSAdapter(width=8, window=3, pad=pad)
    grid = torch.randn(2, 6, 7, 8)
    mask = torch.rand(2, 6, 7) > 0.3
    assert_close(lfs.statistic(grid), explicit_window_mean(lfs, grid), atol=1e-5, rtol=0)
    assert_close(
        lfs.statistic(grid, mask), explicit_window_mean(lfs, grid, mask), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("aggregation", ["mean", "abs", "power"])
def test_masked_lfs_with_all_valid_mask_equals_plain_lfs(aggregation):
    torch.manual_seed(0)
    lfs = LFSAdapter(width=8, window=3, aggregation=aggregation)
    grid = torch.randn(2, 8, 8, 8)
    assert_close(lfs(grid, torch.ones(2, 8, 8, dtype=torch.bool)), lfs(grid))


@pytest.mark.parametrize("aggregation", ["mean", "abs"])
def test_masked_lfs_ignores_letterbox_tokens(aggregation):
    torch.manual_seed(0)
    lfs = LFSAdapter(width=8, window=3, aggregation=aggregation)
    grid = torch.randn(1, 8, 8, 8)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    mask[:, :, 6:] = False  # letterbox columns on the right
    changed = grid.clone()
    changed[:, :, 6:] = 100 * torch.randn(1, 8, 2, 8)
    assert_close(lfs(changed, mask), lfs(grid, mask))
    assert not torch.allclose(lfs(changed)[:, :, :6], lfs(grid)[:, :, :6])  # plain LFS does not


def test_masked_mean_at_the_letterbox_edge_by_hand():
    torch.manual_seed(0)
    lfs = LFSAdapter(width=8, window=3)
    grid = torch.randn(1, 8, 8, 8)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    mask[:, :, 6:] = False
    # Token (3, 5): its window's third column is letterbox; 6 valid neighbours, rescaled by 9/6.
    kernel = lfs.kernel
    x = grid[0].permute(2, 0, 1)  # [D, H, W]
    window = x[:, 2:5, 4:7]  # rows 2..4, cols 4..6 around token (3, 5)
    expected = 9 / 6 * (kernel[:, :2] * window[:, :, :2]).sum(dim=(1, 2))
    assert_close(lfs.statistic(grid, mask)[0, :, 3, 5], expected)


def test_lambda_zero_reproduces_encode_image_and_intermediates(tiny_clip):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    model = FEClip(FEClipConfig(block_indices=TAPS, lambda_fuse=0.0), tiny_clip)
    features = model.encode_image(images)
    reference = tiny_clip.visual.forward_intermediates(
        images, indices=TAPS, output_fmt="NLC", output_extra_tokens=True
    )
    for position in range(len(TAPS)):
        assert_close(features.patch_tokens[position], reference["image_intermediates"][position])
        prefix = reference["image_intermediates_prefix"][position][:, 0]
        assert_close(features.cls_tokens[position], prefix)
    embedding = backbone.project_image_tokens(tiny_clip, features.cls_tokens[-1])
    assert_close(embedding, tiny_clip.encode_image(images), atol=1e-4, rtol=0)


def test_fusion_changes_the_stream_after_the_first_tap(tiny_clip):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    model = FEClip(FEClipConfig(block_indices=[15, 18, 21, 23]), tiny_clip)
    features = model.encode_image(images)
    reference = tiny_clip.visual.forward_intermediates(
        images, indices=[15, 18], output_fmt="NLC", output_extra_tokens=True
    )
    # The first tap's CLS is untouched; the next tap sees the fused patches through attention.
    assert_close(features.cls_tokens[0], reference["image_intermediates_prefix"][0][:, 0])
    assert not torch.allclose(features.cls_tokens[1], reference["image_intermediates_prefix"][1])


def test_only_adapters_get_gradients_and_clip_stays_in_eval(tiny_clip):
    model = FEClip(None, tiny_clip)
    width, dim = backbone.vision_width(tiny_clip), backbone.embed_dim(tiny_clip)
    per_tap = (width * width + width) + (9 * width * width + width)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * per_tap + width * dim + dim
    model.train()
    assert not model.clipmodel.training and model.ffe.training and model.fc_patch.training
    output = model(torch.randn(2, 3, 64, 64))
    (output.image_logits.sum() + output.patch_logits.sum()).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("clipmodel."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert set(model.trainable_state_dict()) == {
        name for name, _ in model.named_parameters() if not name.startswith("clipmodel.")
    }


def test_margin_logit_is_the_two_prompt_softmax(tiny_clip):
    model = FEClip(None, tiny_clip)
    embeddings = torch.randn(5, backbone.embed_dim(tiny_clip))
    cosines = F.normalize(embeddings, dim=-1) @ model.text_features.T
    softmax = torch.softmax(cosines / model.config.temperature, dim=-1)[:, 1]
    assert_close(torch.sigmoid(model.margin_logits(embeddings)), softmax)


def test_binary_focal_loss_against_hand_values():
    probs = torch.tensor([0.9, 0.2]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # Both pixels have p_t = 0.9 / 0.8: -(0.1² log 0.9 + 0.2² log 0.8) / 2.
    expected = -(0.01 * torch.log(torch.tensor(0.9)) + 0.04 * torch.log(torch.tensor(0.8))) / 2
    assert_close(binary_focal_loss(probs, target), expected)
    weighted = -(
        0.25 * 0.01 * torch.log(torch.tensor(0.9)) + 0.75 * 0.04 * torch.log(torch.tensor(0.8))
    )
    assert_close(binary_focal_loss(probs, target, alpha=0.25), weighted / 2)


def test_predict_maps_scores_and_letterbox_mask(tiny_clip):
    torch.manual_seed(0)
    model = FEClip(None, tiny_clip).eval()
    images = torch.randn(2, 3, 64, 64)
    output = model.predict(images, ["object", "object"])
    assert output.anomaly_map.shape == (2, 64, 64) and output.image_score.shape == (2,)
    assert 0 <= output.anomaly_map.min() and output.anomaly_map.max() <= 1
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    assert_close(model.predict(images, ["a", "b"], valid), output)
    valid[:, :, 44:] = False  # letterbox: 2.5 of 8 token columns are padding
    assert token_valid_mask(valid, 8, 0.5)[0].sum(0).tolist() == [8] * 6 + [0] * 2
    masked = model.predict(images, ["a", "b"], valid)
    assert masked.anomaly_map[:, :, 44:].abs().max() == 0
    with pytest.raises(DataError, match="valid_mask has shape"):
        model.predict(images, ["a", "b"], valid[:, :32])
    model.config = dataclasses.replace(model.config, smoothing_sigma=2.0)
    assert "sigma 2" in model.smoothing
    assert model.predict(images, ["a", "b"]).anomaly_map.shape == (2, 64, 64)


def test_loss_falls_on_a_synthetic_batch(tiny_clip, synthetic_root, tmp_path):
    torch.manual_seed(0)
    records = ensure_training_records("Synthetic", synthetic_root, "few_shot", 8, 0, tmp_path)
    dataset = TrainDataset(records, synthetic_root, Preprocessing(64), augment=False)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    assert batch["label"].min() == 0 and batch["label"].max() == 1
    model = FEClip(FEClipConfig(lr=3e-3, fc_patch_lr_ratio=1.0), tiny_clip)
    stage = model.stages()[0]
    optimizer, _ = model.configure_optimizer(stage)
    model.train()
    losses = []
    for _ in range(20):
        loss = model.loss(model.forward_train(batch, stage), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Masks cover ~3% of the pixels, so dice falls slowly; the random tiny CLIP's CLS barely moves.
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses), losses


def test_fc_patch_learning_rate_ratio_and_frozen_option(tiny_clip):
    model = FEClip(FEClipConfig(lr=5e-4, fc_patch_lr_ratio=0.01), tiny_clip)
    optimizer, _ = model.configure_optimizer(model.stages()[0])
    assert [group["lr"] for group in optimizer.param_groups] == [5e-4, 5e-6]
    model.config = dataclasses.replace(model.config, fc_patch_lr_ratio=0.0)
    model.configure_optimizer(model.stages()[0])
    assert not any(p.requires_grad for p in model.fc_patch.parameters())


def test_checkpoint_round_trip_and_mismatches(tiny_clip, tmp_path):
    torch.manual_seed(0)
    config = {
        "model": "feclip",
        "model_name": "tiny",
        "pretrained": "openai",
        "img_size": 64,
        "quick_gelu": False,
        "tap_indices": [15, 18, 21, 23],
        "lambda_fuse": 0.1,
        "ffe_window": 3,
        "lfs_window": 3,
        "temperature": 0.07,
    }
    model = FEClip(None, backbone.tiny_clip(64))
    for parameter in model.fc_patch.parameters():
        parameter.data.normal_()
    path = tmp_path / "feclip.pth"
    save_checkpoint(path, {"epoch": 3, "feclip": model.trainable_state_dict(), "config": config})
    loaded, payload = FEClip.from_checkpoint(path)
    assert payload["epoch"] == 3 and not loaded.training
    images = torch.randn(2, 3, 64, 64)
    assert_close(loaded.predict(images, ["a", "b"]), model.eval().predict(images, ["a", "b"]))
    with pytest.raises(CheckpointError, match="lambda_fuse=0.1.*pass --lambda_fuse 0.1"):
        FEClip.from_checkpoint(path, overrides={"lambda_fuse": 0.5})
    rebuilt = FEClip.from_checkpoint(path, overrides={"smoothing_sigma": 2.0})[0]
    assert rebuilt.config.smoothing_sigma == 2.0
    other = tmp_path / "other.pth"
    save_checkpoint(other, {"epoch": 1, "image_adapter": {}, "config": {"model": "aaclip"}})
    with pytest.raises(CheckpointError, match="model='aaclip'"):
        FEClip.from_checkpoint(other)


def test_the_default_loss_is_the_forks_formula(tiny_clip):
    """With no flags: focal with α 0.25 (positives; 0.75 negatives) and dice smoothing 1e-6, as
    the fork's losses.py, restated here on a fixed batch."""
    model = FEClip(FEClipConfig(), tiny_clip)
    generator = torch.Generator().manual_seed(0)
    output = TapLogits(
        torch.randn(4, 2, generator=generator), torch.randn(4, 2, 8, 8, generator=generator)
    )
    mask = (torch.rand(2, 1, 64, 64, generator=generator) > 0.7).float()
    label = torch.tensor([1.0, 0.0])
    got = model.loss(output, {"mask": mask, "label": label})
    cls = F.binary_cross_entropy_with_logits(output.image_logits, label.expand(4, -1))
    mask_losses = []
    for logits in output.patch_logits:
        p = F.interpolate(torch.sigmoid(logits)[:, None], size=64, mode="bilinear").clamp(
            1e-6, 1 - 1e-6
        )
        pt = torch.where(mask > 0.5, p, 1 - p)
        alpha = torch.where(mask > 0.5, 0.25, 0.75)
        focal = (-alpha * (1 - pt) ** 2 * torch.log(pt)).mean()
        dice = (
            1
            - (
                (2 * (p * mask).flatten(1).sum(1) + 1e-6)
                / (p.flatten(1).sum(1) + mask.flatten(1).sum(1) + 1e-6)
            ).mean()
        )
        mask_losses.append(focal + dice)
    expected_mask = sum(mask_losses) / 4
    assert_close(got["cls"], cls)
    assert_close(got["mask"], expected_mask)
    assert_close(got["loss"], cls + expected_mask)
