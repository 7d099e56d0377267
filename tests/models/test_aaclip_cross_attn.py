"""AAClipCrossAttn on the tiny backbone: the gate keeps the base model exactly,
contexts follow the fork's batch rules, gradients reach only the trained modules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from models.aaclip import AAClip
from models.aaclip_cross_attn import (
    AAClipCrossAttn,
    AAClipCrossAttnConfig,
    CrossAttention,
    carry_optimizer_state,
    image_batch_context,
    text_batch_context,
)
from models.forward_utils import get_adapted_single_class_text_embedding

SENTENCES = ["a photo of a tile.", "a damaged tile."]


@pytest.fixture
def pair(tiny_clip):
    """A base AA-CLIP and a gated cross-attention model sharing its CLIP and adapters."""
    torch.manual_seed(0)
    base = AAClip(None, tiny_clip).eval()
    model = AAClipCrossAttn(AAClipCrossAttnConfig(cross_attn_heads=4), tiny_clip).eval()
    model.text_adapter.load_state_dict(base.text_adapter.state_dict())
    model.image_adapter.load_state_dict(base.image_adapter.state_dict())
    return base, model


def image_context(model, images):
    return model.surgery_features(images)[0][0]  # first-level stage-1 features [B, g², D]


def open_gates(model, value=0.5):
    with torch.no_grad():
        model.text_cross_attn_gate.fill_(value)
        model.image_cross_attn_gate.fill_(value)


def test_closed_gates_reproduce_the_base_model_exactly(pair):
    base, model = pair
    images = torch.randn(2, 3, 64, 64)
    token_ids = model.tokenize(SENTENCES)
    context = image_context(model, images)
    with torch.no_grad():
        assert torch.equal(
            model.encode_text(token_ids, image_context=context), base.encode_text(token_ids)
        )
        text_context, _ = model.stack_contexts(
            [model.class_text_context(name) for name in ["tile", "dots"]]
        )
        seg, det = model(images, text_context)
        seg_base, det_base = base(images)
    for tokens, expected in zip(seg, seg_base, strict=True):
        assert torch.equal(tokens, expected)
    assert torch.equal(det, det_base)
    ours, theirs = model.predict(images, ["tile", "tile"]), base.predict(images, ["tile", "tile"])
    assert torch.equal(ours.anomaly_map, theirs.anomaly_map)
    assert torch.equal(ours.image_score, theirs.image_score)


def test_xavier_init_perturbs_the_base_at_step_zero_as_the_fork(tiny_clip):
    base = AAClip(None, tiny_clip).eval()
    model = AAClipCrossAttn(
        AAClipCrossAttnConfig(cross_attn_heads=4, cross_attn_init="xavier"), tiny_clip
    )
    model.text_adapter.load_state_dict(base.text_adapter.state_dict())
    model.image_adapter.load_state_dict(base.image_adapter.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        context, _ = model.eval().stack_contexts([model.class_text_context("tile")])
        seg, _ = model(images, context)
        seg_base, _ = base(images)
    assert not torch.allclose(seg[0], seg_base[0], atol=1e-4)


def test_test_mode_none_is_the_base_and_image_uses_the_module(pair):
    base, model = pair
    open_gates(model)
    images = torch.randn(2, 3, 64, 64)
    names = ["tile", "dots"]
    model.config = dataclasses.replace(model.config, cross_attn_at_test="none")
    assert torch.equal(model.predict(images, names).anomaly_map, base.predict(images, names)[0])
    model.config = dataclasses.replace(model.config, cross_attn_at_test="image")
    first = model.predict(images, names).anomaly_map
    assert not torch.allclose(first, base.predict(images, names)[0], atol=1e-4)
    with torch.no_grad():  # norm matching cancels a uniform scale, so perturb the weights
        model.image_cross_attn.out_proj.weight.add_(
            torch.randn_like(model.image_cross_attn.out_proj.weight)
        )
    assert not torch.allclose(model.predict(images, names).anomaly_map, first, atol=1e-5)


def test_both_mode_conditions_each_images_anchors_on_that_image(pair):
    _, model = pair
    open_gates(model)
    model.config = dataclasses.replace(
        model.config, surgery_attention="per_image"
    )  # batch_mix would mix the two images' contexts
    images = torch.randn(2, 3, 64, 64)
    model.config = dataclasses.replace(model.config, cross_attn_at_test="both")
    both = model.predict(images, ["tile", "tile"])
    single = model.predict(images[1:], ["tile"])
    assert_close(both.anomaly_map[1:], single.anomaly_map, atol=1e-5, rtol=1e-5)
    model.config = dataclasses.replace(model.config, cross_attn_at_test="image")
    assert not torch.allclose(model.predict(images, ["tile"] * 2)[0], both[0], atol=1e-5)


def test_norm_matched_branch_adds_weight_times_token_norm(pair):
    _, model = pair
    x = torch.randn(2, 5, 8)
    attended = torch.randn(2, 5, 8) * 100
    out = model._branch(x, attended, 0.1, None)
    assert_close((out - x).norm(dim=-1), 0.1 * x.norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_text_batch_rule_averages_unless_the_counts_match():
    context = torch.randn(4, 3, 8)
    assert torch.equal(text_batch_context(context, 4), context)
    averaged = text_batch_context(context, 6)
    assert averaged.shape == (6, 3, 8)
    assert_close(averaged[5], context.mean(dim=0))


def test_image_batch_rule_broadcasts_one_context_and_refuses_other_sizes():
    context = torch.randn(1, 3, 8)
    assert torch.equal(image_batch_context(context, 4)[2], context[0])
    with pytest.raises(ValueError, match="does not match"):
        image_batch_context(torch.randn(3, 3, 8), 4)


def test_cross_attention_matches_a_direct_computation():
    torch.manual_seed(0)
    module = CrossAttention(query_dim=8, context_dim=6, inner_dim=4, heads=2)
    x, context = torch.randn(1, 3, 8), torch.randn(1, 5, 6)
    mask = torch.tensor([[True, True, False, True, False]])
    q, k, v = module.q_proj(x), module.k_proj(context), module.v_proj(context)
    heads = []
    for h in range(2):
        part = slice(2 * h, 2 * h + 2)
        logits = q[0, :, part] @ k[0, :, part].T / 2**0.5
        logits = logits.masked_fill(~mask[0], float("-inf"))
        heads.append(torch.softmax(logits, dim=-1) @ v[0, :, part])
    expected = module.out_proj(torch.cat(heads, dim=-1))
    assert_close(module(x, context, mask)[0], expected, atol=1e-6, rtol=1e-5)


def test_text_context_is_normalised_with_a_key_mask_up_to_end_of_text(pair):
    _, model = pair
    context, mask = model.class_text_context("tile")
    assert context.shape == (16 * 77, 64)
    assert_close(context.norm(dim=-1), torch.ones(16 * 77))
    token_ids = model.tokenize(["tile."])
    assert mask[:77].sum() == token_ids.argmax(dim=-1).item() + 1


def test_gradients_reach_only_the_stage_modules(pair):
    _, model = pair
    open_gates(model)
    images = torch.randn(2, 3, 64, 64)
    text_stage, image_stage = model.stages()
    model.trainable_parameters(text_stage)
    anchors = get_adapted_single_class_text_embedding(
        model, "tile", "cpu", image_context=image_context(model, images)
    )
    anchors.sum().backward()
    model.trainable_parameters(image_stage)
    context, _ = model.stack_contexts([model.class_text_context(name) for name in ["tile", "tile"]])
    seg, det = model(images, context)
    (sum(tokens.sum() for tokens in seg) + det.sum()).backward()
    trained = ("text_adapter", "text_cross_attn", "image_adapter", "image_cross_attn")
    for name, parameter in model.named_parameters():
        if name.startswith(trained):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_base_adam_moments_carry_over_to_the_adapters_only(pair):
    base, model = pair
    base_optimizer = torch.optim.Adam(base.image_adapter.parameters(), lr=1e-3)
    seg, det = base(torch.randn(2, 3, 64, 64))
    (sum(tokens.sum() for tokens in seg) + det.sum()).backward()
    base_optimizer.step()
    optimizer, _ = model.configure_optimizer(model.stages()[1])
    count = len(list(model.image_adapter.parameters()))
    carry_optimizer_state(optimizer, base_optimizer.state_dict(), count, "base.pth")
    adapters = list(model.image_adapter.parameters())
    expected = list(base.image_adapter.parameters())
    for ours, theirs in zip(adapters, expected, strict=True):
        assert torch.equal(
            optimizer.state[ours]["exp_avg"], base_optimizer.state[theirs]["exp_avg"]
        )
    assert all(optimizer.state[p] == {} for p in model.image_cross_attn.parameters())
