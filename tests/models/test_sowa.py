"""SOWA on the tiny backbone: windows, the HFWA attention, features, gradients, memory, loss."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from datasets.anomaly import TrainDataset
from datasets.metadata import build_records
from datasets.preprocessing import Preprocessing
from models import backbone
from models.base import MapExtrema
from models.forward_utils import gaussian_smooth
from models.sowa import (
    SOWA,
    HFWAAdapter,
    SOWAConfig,
    WindowAttention,
    window_partition,
    window_reverse,
)
from utils.core.errors import ConfigError
from utils.inference.predictor import AnomalyPredictor


def sowa_loss(model, output, mask, label):
    """The model's loss as (total, image CE, pixel loss)."""
    losses = model.loss(output, {"mask": mask, "label": label})
    return losses["loss"], losses["ce"], losses["seg"]


@pytest.fixture
def sowa(tiny_clip):
    torch.manual_seed(0)
    return SOWA(None, tiny_clip).eval()


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("height", "width", "window"), [(8, 8, 4), (7, 10, 4), (24, 24, 12)])
def test_window_partition_round_trips(height, width, window):
    x = torch.randn(2, height, width, 5)
    windows, padded = window_partition(x, window)
    assert padded == (math.ceil(height / window) * window, math.ceil(width / window) * window)
    assert windows.shape == (2 * padded[0] * padded[1] // window**2, window**2, 5)
    torch.testing.assert_close(window_reverse(windows, window, padded, (height, width)), x)


def test_windows_are_row_major():
    x = torch.arange(16.0).view(1, 4, 4, 1)
    windows, _ = window_partition(x, 2)
    assert windows[:, :, 0].tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]


def test_value_only_attention_equals_a_direct_computation_on_one_window(tiny_clip):
    torch.manual_seed(1)
    window, heads = 3, 4
    attention = WindowAttention(window, heads, cpb_dim=16).eval()
    with torch.no_grad():
        attention.logit_scale.copy_(torch.tensor([0.5, 2.0, 4.0, 6.0]).view(heads, 1, 1))
    weights = backbone.vision_attention_weights(tiny_clip, 5)
    x = torch.randn(1, window * window, 64)
    width = 64 // heads
    coords = [(h, w) for h in range(window) for w in range(window)]
    outputs = []
    for head in range(heads):
        w_v = weights.in_proj_weight[128 + head * width : 128 + (head + 1) * width]
        v = x[0] @ w_v.T  # no in_proj_bias
        logits = torch.empty(window**2, window**2)
        for i, (hi, wi) in enumerate(coords):
            for j, (hj, wj) in enumerate(coords):
                t = torch.tensor([(hi - hj) / (window - 1) * 8, (wi - wj) / (window - 1) * 8])
                t = torch.sign(t) * torch.log2(t.abs() + 1) / math.log2(8)
                bias = 16 * torch.sigmoid(attention.cpb_mlp(t)[head])
                cosine = torch.dot(v[i], v[j]) / (v[i].norm() * v[j].norm())
                scale = math.exp(min(attention.logit_scale[head].item(), math.log(100)))
                logits[i, j] = cosine * scale + bias
        outputs.append(torch.softmax(logits, dim=-1) @ v)
    expected = torch.cat(outputs, dim=-1) @ weights.out_proj_weight.T + weights.out_proj_bias
    with torch.no_grad():
        torch.testing.assert_close(attention(x, weights)[0], expected, rtol=1e-4, atol=1e-5)


def test_zeroed_adapter_gives_the_raw_hooked_tokens_projected(sowa, tiny_clip):
    with torch.no_grad():
        for adapter in sowa.adapters:
            for block in adapter.blocks:
                for norm in (block.norm1, block.norm2):
                    norm.weight.zero_()
                    norm.bias.zero_()
    x = images()
    with torch.no_grad():
        global_embedding, raw, adapted = sowa.encode_image(x)
        reference = tiny_clip.visual.forward_intermediates(
            x, indices=[5, 11, 17, 23], output_fmt="NLC", normalize_intermediates=False
        )
    for stage, tokens in enumerate(reference["image_intermediates"]):
        expected = tokens @ tiny_clip.visual.proj  # no ln_post (quirk)
        torch.testing.assert_close(raw[stage], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapted[stage], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(global_embedding, reference["image_features"], rtol=1e-4, atol=1e-5)


def test_window_larger_than_the_grid_is_one_global_window():
    adapter = HFWAAdapter(64, grid=8, window=12, num_heads=8, depth=2)
    assert [(block.window, block.shift) for block in adapter.blocks] == [(8, 0), (8, 0)]
    shifted = HFWAAdapter(64, grid=8, window=3, num_heads=8, depth=2)
    assert [(block.window, block.shift) for block in shifted.blocks] == [(3, 0), (3, 1)]
    mask = shifted.blocks[1].window_mask((8, 8), torch.device("cpu"))
    assert mask.shape == (9, 9, 9) and torch.isinf(mask).any() and (mask == -100).any()
    with pytest.raises(ConfigError, match="--num_heads 6 must divide"):
        HFWAAdapter(64, grid=8, num_heads=6)


def test_padded_and_shifted_windows_give_finite_maps(tiny_clip):
    model = SOWA(SOWAConfig(window_size=3, depth=2), tiny_clip).eval()
    output = model.predict(images(), ["tile", "tile"])
    assert torch.isfinite(output.anomaly_map).all() and output.anomaly_map.shape == (2, 64, 64)


def test_gradients_reach_only_adapters_prompts_and_text_linear(sowa):
    sowa.train()
    output = sowa(images())
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 10:30, 10:30] = 1
    loss, _, _ = sowa_loss(sowa, output, mask, torch.tensor([1, 0]))
    loss.backward()
    for name, parameter in sowa.named_parameters():
        if name.startswith("clipmodel."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    trainable = {name.split(".")[0] for name, p in sowa.named_parameters() if p.requires_grad}
    assert trainable == {"adapters", "prompt_learner", "text_linear"}
    assert not sowa.clipmodel.training


def test_pixel_maps_are_softmaxes_of_raw_cosines(sowa):
    with torch.no_grad():
        output = sowa(images())
    for probs in output.stage_probs:
        assert probs.shape == (2, 2, 64, 64)
        torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))
        # σ(cos_a - cos_n) lies in [σ(-2), σ(2)]: no temperature on the pixel softmax
        assert probs.min() >= torch.sigmoid(torch.tensor(-2.0)) - 1e-6
    torch.testing.assert_close(output.text_probs, torch.softmax(output.text_logits, -1))


def test_memory_map_is_zero_for_a_support_image(sowa):
    support = images(3, seed=1)
    memory = sowa.encode_memory(support)
    with torch.no_grad():
        _, raw_support, _ = sowa.encode_image(support[1:2])
        _, raw_other, _ = sowa.encode_image(images(1, seed=2))
    torch.testing.assert_close(
        sowa.memory_map(raw_support, memory), torch.zeros(1, 64, 64), atol=1e-5, rtol=0
    )
    assert sowa.memory_map(raw_other, memory).min() > 1e-3


def test_k_shot_predictor_refuses_to_predict_before_its_support_is_set(sowa):
    predictor = AnomalyPredictor(sowa, k_shot=2)
    with pytest.raises(RuntimeError, match=r"must be set with \.set_support\(images\)"):
        predictor.predict(images(), ["tile"] * 2)
    predictor.set_support(images(2, seed=4))
    assert predictor.predict(images(), ["tile"] * 2).anomaly_map.shape == (2, 64, 64)


def test_predict_adds_the_unsmoothed_memory_map(sowa):
    x = images(2, seed=3)
    predictor = AnomalyPredictor(sowa)
    zero_shot = predictor.predict(x, ["tile"] * 2)
    predictor.set_support(images(2, seed=4))
    k_shot = predictor.predict(x, ["tile"] * 2)
    with torch.no_grad():
        memory = sowa.memory_map(sowa.encode_image(x)[1], sowa.encode_memory(images(2, seed=4)))
    torch.testing.assert_close(
        k_shot.anomaly_map - zero_shot.anomaly_map, memory, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(k_shot.image_score, zero_shot.image_score)
    maps, scores = k_shot.anomaly_map.numpy(), k_shot.image_score.numpy()
    maxima = maps.reshape(2, -1).max(1)
    expected = 0.5 * (scores + (maxima - maxima.min()) / (maxima.max() - maxima.min()))
    np.testing.assert_allclose(predictor.table_image_scores(MapExtrema.of(maps), scores), expected)
    predictor.set_support(None)
    np.testing.assert_allclose(predictor.table_image_scores(MapExtrema.of(maps), scores), scores)


def test_gaussian_filter_matches_scipy():
    maps = torch.rand(2, 20, 13, dtype=torch.float64)
    expected = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in maps.numpy()])
    smoothed = gaussian_smooth(maps, 4.0, border="scipy").numpy()
    np.testing.assert_allclose(smoothed, expected, atol=1e-12)


def test_loss_falls_on_the_synthetic_set(tiny_clip, synthetic_root):
    records = [r for r in build_records("Synthetic", synthetic_root) if r["class_name"] == "dots"]
    normal = [r for r in records if r["label"] == 0][:4]
    anomalous = [r for r in records if r["label"] == 1][:4]
    dataset = TrainDataset(normal + anomalous, synthetic_root, Preprocessing(64), augment=False)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    torch.manual_seed(0)
    model = SOWA(SOWAConfig(attn_drop=0.0), tiny_clip).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.2
    )
    losses = []
    for _ in range(8):
        loss, _, _ = sowa_loss(model, model(batch["image"]), batch["mask"], batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_ce_on_probabilities_is_a_double_softmax(sowa):
    with torch.no_grad():
        output = sowa(images())
    label = torch.tensor([1, 0])
    mask = torch.zeros(2, 1, 64, 64)
    _, quirk, _ = sowa_loss(sowa, output, mask, label)
    sowa.config = dataclasses.replace(sowa.config, ce_on_probabilities=False)
    _, corrected, _ = sowa_loss(sowa, output, mask, label)
    torch.testing.assert_close(quirk, F.cross_entropy(output.text_probs, label))
    torch.testing.assert_close(corrected, F.cross_entropy(output.text_logits, label))
