"""The walker reproduces open_clip exactly when nothing is hooked (tiny random CLIP)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from models import backbone


def test_walk_vision_equals_encode_image_and_intermediates(tiny_clip):
    images = torch.randn(2, 3, 64, 64)
    recorded = {}

    def record(index, tokens):
        recorded[index] = tokens
        return tokens

    x = backbone.walk_vision(tiny_clip, backbone.vision_embed(tiny_clip, images), record)
    assert_close(backbone.vision_pool(tiny_clip, x), tiny_clip.encode_image(images))
    reference = tiny_clip.visual.forward_intermediates(
        images, indices=[5, 11, 17, 23], output_fmt="NLC", output_extra_tokens=True
    )
    for position, index in enumerate([5, 11, 17, 23]):
        assert_close(recorded[index][:, 1:], reference["image_intermediates"][position])
        assert_close(recorded[index][:, :1], reference["image_intermediates_prefix"][position])


def test_walk_text_equals_encode_text(tiny_clip):
    token_ids = backbone.get_tokenizer()(["a photo of a dark bottle.", "a broken screw."])
    x = backbone.walk_text(tiny_clip, backbone.text_embed(tiny_clip, token_ids))
    pooled = backbone.text_pool(tiny_clip, x, token_ids)
    assert_close(backbone.text_project(tiny_clip, pooled), tiny_clip.encode_text(token_ids))


def test_batch_first_layout(tiny_clip):
    assert tiny_clip.visual.transformer.batch_first
    assert tiny_clip.transformer.batch_first


def test_dimensions_come_from_the_backbone(tiny_clip):
    assert backbone.vision_width(tiny_clip) == 64
    assert backbone.embed_dim(tiny_clip) == 32
    assert backbone.num_vision_blocks(tiny_clip) == 24
    assert backbone.num_text_blocks(tiny_clip) == 12
    assert backbone.grid_size(tiny_clip) == 8


def test_weights_returning_attention_equals_fused(tiny_clip):
    x = backbone.vision_embed(tiny_clip, torch.randn(2, 3, 64, 64))
    block = tiny_clip.visual.transformer.resblocks[3]
    assert_close(backbone.run_block(block, x, "weights_returning"), block(x))
    text = backbone.text_embed(tiny_clip, torch.randint(0, 49408, (2, 77)))
    block, mask = tiny_clip.transformer.resblocks[2], tiny_clip.attn_mask  # causal
    weights_returning = backbone.run_block(block, text, "weights_returning", attn_mask=mask)
    assert_close(weights_returning, block(text, attn_mask=mask))


def test_value_value_attention_per_image_matches_direct_computation(tiny_clip):
    block = tiny_clip.visual.transformer.resblocks[7]
    h = torch.randn(2, 65, 64)
    width, heads = 64, block.attn.num_heads
    v = F.linear(h, block.attn.in_proj_weight[2 * width :], block.attn.in_proj_bias[2 * width :])
    v = v.view(2, 65, heads, width // heads).transpose(1, 2)  # [B, H, L, hd]
    weights = torch.softmax(v @ v.transpose(-1, -2) * (width // heads) ** -0.5, dim=-1)
    direct = block.attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 65, width))
    assert_close(backbone.value_value_attention(block, h, per_image=True), direct)


def test_batch_mix_of_one_image_is_out_proj_of_v(tiny_clip):
    block = tiny_clip.visual.transformer.resblocks[7]
    h = torch.randn(1, 65, 64)
    v = F.linear(h, block.attn.in_proj_weight[128:], block.attn.in_proj_bias[128:])
    assert_close(backbone.value_value_attention(block, h, per_image=False), block.attn.out_proj(v))


def test_load_clip_tiny_is_frozen_and_deterministic():
    first = backbone.load_clip("tiny", img_size=64)
    second = backbone.load_clip("tiny", img_size=64)
    assert not any(parameter.requires_grad for parameter in first.parameters())
    assert not first.training
    assert_close(first.visual.proj, second.visual.proj)


def test_load_clip_unknown_name_suggests_the_closest():
    from utils.core.errors import ConfigError

    with pytest.raises(
        ConfigError, match="unknown --model_name 'ViT-L-14-33'; did you mean ViT-L-14-336"
    ):
        backbone.load_clip("ViT-L-14-33")
    with pytest.raises(ConfigError, match=r"open_clip.list_models\(\) lists all"):
        backbone.load_clip("ViT-Q")
