"""AAClip on the tiny backbone: equivalences, surgery quirk, shapes, gradients, keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from models import backbone
from models.aaclip import AAClip, AAClipConfig, aaclip_image_scores
from models.adapters import residual_blend
from models.base import MapExtrema
from models.forward_utils import calculate_similarity_map, get_adapted_single_class_text_embedding
from utils.core.checkpoint import save_checkpoint
from utils.core.errors import CheckpointError, ConfigError


class TextProjection(nn.Module):
    """Stands in for the final text adapter: CLIP's own frozen projection."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, x):
        return x @ self.clip.text_projection


class FrozenProjection(nn.Module):
    """Stands in for a seg projection: ln_post is applied before; apply CLIP's proj."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, x):
        return x @ self.clip.visual.proj


def test_zero_weight_text_path_equals_encode_text(tiny_clip):
    model = AAClip(AAClipConfig(text_adapt_weight=0.0), tiny_clip)
    model.text_adapter[-1] = TextProjection(tiny_clip)
    token_ids = model.tokenize(["a photo of a dark bottle.", "a dark bottle with flaw."])
    assert_close(model.encode_text(token_ids), tiny_clip.encode_text(token_ids), atol=1e-5, rtol=0)


def test_zero_weight_vision_levels_equal_forward_intermediates(tiny_clip):
    model = AAClip(AAClipConfig(image_adapt_weight=0.0), tiny_clip)
    for index in range(4):
        model.image_adapter["seg_proj"][index] = FrozenProjection(tiny_clip)
    images = torch.randn(2, 3, 64, 64)
    seg_tokens, _ = model(images)
    reference = tiny_clip.visual.forward_intermediates(
        images, indices=[5, 11, 17, 23], output_fmt="NLC", normalize_intermediates=True
    )["image_intermediates"]
    for tokens, expected in zip(seg_tokens, reference, strict=True):
        assert_close(tokens, F.normalize(expected @ tiny_clip.visual.proj, dim=-1))


def test_plain_clip_text_when_no_text_adapter(tiny_clip):
    model = AAClip(None, tiny_clip)
    model.use_text_adapter = False
    token_ids = model.tokenize(["a photo of a screw."])
    assert_close(model.encode_text(token_ids), tiny_clip.encode_text(token_ids))


def test_residual_blend_preserves_norm():
    x = torch.randn(5, 7, 16)
    parallel = residual_blend(x, 3.0 * x, 0.3)
    assert_close(parallel.norm(dim=-1), x.norm(dim=-1))
    other = residual_blend(x, torch.randn(5, 7, 16), 0.3)
    assert (other.norm(dim=-1) <= x.norm(dim=-1) + 1e-5).all()
    assert_close(residual_blend(x, torch.randn(5, 7, 16), 0.0), x)


def test_surgery_replaces_the_last_blocks(tiny_clip):
    assert list(AAClip(AAClipConfig(surgery_until_layer=20), tiny_clip).surgery_blocks()) == list(
        range(5, 24)
    )


def test_batch_mix_mixes_images_and_per_image_does_not(tiny_clip):
    images = torch.randn(3, 3, 64, 64)
    changed = images.clone()
    changed[1] = torch.randn(3, 64, 64)
    mixed = AAClip(AAClipConfig(surgery_attention="batch_mix"), tiny_clip)
    separate = AAClip(AAClipConfig(surgery_attention="per_image"), tiny_clip)
    a = mixed.surgery_features(images)[0][-1][0]
    b = mixed.surgery_features(changed)[0][-1][0]
    assert not torch.allclose(a, b)
    a = separate.surgery_features(images)[0][-1][0]
    b = separate.surgery_features(changed)[0][-1][0]
    assert_close(a, b)


def test_surgery_features_match_a_straightforward_two_pass_computation(tiny_clip):
    model = AAClip(AAClipConfig(surgery_attention="per_image"), tiny_clip)
    images = torch.randn(2, 3, 64, 64)
    features, cls = model.surgery_features(images)
    assert_close(cls, F.normalize(tiny_clip.encode_image(images), dim=-1))
    x = backbone.vision_embed(tiny_clip, images)
    levels = []
    for index, block in enumerate(tiny_clip.visual.transformer.resblocks):
        rule = "vv_per_image" if index >= 5 else "standard"
        x = backbone.run_block(block, x, rule)
        if index + 1 in (6, 12, 18, 24):
            levels.append(x[:, 1:])
    for got, tokens in zip(features, levels, strict=True):
        expected = (
            F.normalize(backbone.project_image_tokens(tiny_clip, tokens), dim=-1) + cls[:, None]
        )
        assert_close(got, expected)


def test_shapes_and_norms(tiny_clip):
    model = AAClip(None, tiny_clip)
    images = torch.randn(3, 3, 64, 64)
    anchors = get_adapted_single_class_text_embedding(model, "dark bottle", "cpu")
    assert anchors.shape == (32, 2)
    assert_close(anchors.norm(dim=0), torch.ones(2))
    seg_tokens, det_token = model(images)
    assert len(seg_tokens) == 4
    for tokens in seg_tokens:
        assert tokens.shape == (3, 64, 32)
        assert_close(tokens.norm(dim=-1), torch.ones(3, 64))
    assert det_token.shape == (3, 32)
    assert (det_token.norm(dim=-1) <= 1 + 1e-6).all()
    text = anchors.expand(3, 32, 2)
    train_map = calculate_similarity_map(seg_tokens[0], text, 64)
    assert train_map.shape == (3, 2, 64, 64)
    assert_close(train_map.sum(1), torch.ones(3, 64, 64))
    output = model.predict(images, ["bottle"] * 3, text={"bottle": anchors})
    assert output.anomaly_map.shape == (3, 64, 64)
    assert output.image_score.shape == (3,)


def test_stage2_gradients_reach_only_image_adapters(tiny_clip):
    model = AAClip(None, tiny_clip)
    seg_tokens, det_token = model(torch.randn(2, 3, 64, 64))
    (sum(tokens.sum() for tokens in seg_tokens) + det_token.sum()).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("image_adapter."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_stage1_gradients_reach_only_text_adapters(tiny_clip):
    model = AAClip(None, tiny_clip)
    anchors = get_adapted_single_class_text_embedding(model, "dark bottle", "cpu")
    features = model.surgery_features(torch.randn(2, 3, 64, 64))[0]
    calculate_similarity_map(features[-1], anchors.expand(2, 32, 2), 64)[:, 1].mean().backward()
    for name, parameter in model.named_parameters():
        if name.startswith("text_adapter."):
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize(
    ("relu", "proj_key"), [(False, "seg_proj.0.fc.weight"), (True, "seg_proj.0.fc.0.weight")]
)
def test_state_dict_keys_equal_the_original(tiny_clip, relu, proj_key):
    model = AAClip(AAClipConfig(relu=relu), tiny_clip)
    text_keys = set(model.text_adapter.state_dict())
    assert text_keys == {f"{index}.fc.0.weight" for index in range(4)}
    image_keys = set(model.image_adapter.state_dict())
    assert proj_key in image_keys
    assert f"det_proj.{proj_key.split('.', 2)[2]}" in image_keys
    assert {f"layer_adapters.{index}.fc.0.weight" for index in range(6)} <= image_keys
    assert len(image_keys) == 6 + 4 + 1


def test_original_format_checkpoint_loads_and_relu_mismatch_is_named(tmp_path, tiny_clip):
    trained = AAClip(AAClipConfig(relu=False), tiny_clip)
    path = tmp_path / "image_adapter.pth"
    original = {
        "epoch": 3,
        "image_adapter": trained.image_adapter.state_dict(),
        "image_optimizer": {},
    }
    save_checkpoint(path, original)
    fresh = AAClip(AAClipConfig(relu=False), backbone.tiny_clip())
    fresh.load_adapter(path, "image_adapter")
    for key, value in trained.image_adapter.state_dict().items():
        assert torch.equal(fresh.image_adapter.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="trained with relu=False; pass --no-relu"):
        AAClip(AAClipConfig(relu=True), backbone.tiny_clip()).load_adapter(path, "image_adapter")


def test_checkpoint_with_config_names_the_differing_flag(tmp_path, tiny_clip):
    model = AAClip(AAClipConfig(model_name="tiny", relu=True), tiny_clip)
    path = tmp_path / "image_adapter.pth"
    config = {"model_name": "tiny", "relu": True, "levels": [6, 12, 18, 24]}
    save_checkpoint(
        path, {"epoch": 1, "image_adapter": model.image_adapter.state_dict(), "config": config}
    )
    with pytest.raises(
        CheckpointError, match=r"relu=True but this run has relu=False; pass --relu"
    ):
        AAClip(AAClipConfig(model_name="tiny", relu=False), tiny_clip).load_adapter(
            path, "image_adapter"
        )


def test_tv_k_aaclip_fusion():
    maps = np.array([[[0, 1]], [[2, 0.5]], [[1, 1]]], dtype=np.float32)
    det = np.array([0.3, 0.5, 0.4])
    extrema = MapExtrema.of(maps)
    np.testing.assert_array_equal(extrema.minima, [0, 0.5, 1])
    np.testing.assert_array_equal(extrema.maxima, [1, 2, 1])
    industrial = aaclip_image_scores(extrema, det, "Industrial")
    np.testing.assert_allclose(industrial, [0.25, 1.0, 0.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(aaclip_image_scores(extrema, det, "Medical"), [0.5, 1.0, 0.5])
    with pytest.raises(ConfigError, match="Industrial, Medical"):
        aaclip_image_scores(extrema, det, "industrial-ish")


def test_map_extrema_of_batches_equal_the_class_held_whole():
    maps = np.random.default_rng(0).random((7, 3, 4)).astype(np.float32)
    parts = [MapExtrema.of(maps[batch]) for batch in (slice(0, 3), slice(3, 4), slice(4, 7))]
    whole = MapExtrema.concatenate(parts)
    np.testing.assert_array_equal(whole.minima, maps.min(axis=(1, 2)))
    np.testing.assert_array_equal(whole.maxima, maps.max(axis=(1, 2)))
