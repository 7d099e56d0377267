"""Frozen open_clip CLIP and the block-by-block walkers every model shares.

This is the only module that touches open_clip internals (`_embeds`, `resblocks`, `ln_post`,
`proj`, `ln_final`, `text_projection`, `attn_mask`). open_clip 3.x transformers are batch-first:
tokens are `[B, L, D]` everywhere (the original AA-CLIP code was sequence-first, `[L, B, D]`).
`tests/models/test_backbone.py` checks that walking with no hooks reproduces `encode_image`,
`forward_intermediates` and `encode_text` exactly; run it after any open_clip upgrade.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from utils.core.errors import ConfigError
from utils.core.names import did_you_mean

logger = logging.getLogger(__name__)

TINY = "tiny"
# Every OpenAI CLIP shares one BPE vocabulary and a 77-token context; the tokenizer ships with
# open_clip, so nothing is downloaded.
TOKENIZER_NAME = "ViT-L-14-336"

BlockHook = Callable[[int, torch.Tensor], torch.Tensor]
ATTENTION_MODES = ("standard", "vv_batch_mix", "vv_per_image", "weights_returning")


def tiny_clip(img_size: int = 64, quick_gelu: bool = False, seed: int = 0) -> CLIP:
    """A random CLIP with ViT-L-14's depth (24 vision, 12 text blocks) and tiny widths.

    Default level indices (6, 12, 18, 24), taps and hooks therefore run unchanged; it keeps the
    real tokenizer and vocabulary. Built under a fixed seed so every run gets the same weights.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(
                layers=24, width=64, head_width=32, patch_size=8, image_size=img_size
            ),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=12),
            quick_gelu=quick_gelu,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def load_clip(
    model_name: str,
    pretrained: str | None = "openai",
    img_size: int | None = None,
    quick_gelu: bool = False,
    device: str | torch.device = "cpu",
) -> CLIP:
    """Build a frozen, eval-mode CLIP.

    Args:
        model_name: `tiny` (random test backbone) or an open_clip model name, e.g. `ViT-L-14-336`.
        pretrained: open_clip tag (`openai`) or a local weights file (the OpenAI JIT archive
            `ViT-L-14-336px.pt` works); ignored for `tiny`.
        img_size: input side; positional embeddings are resized (bicubic, open_clip's
            `resize_pos_embed`, identical to the original's resize).
        quick_gelu: the released AA-CLIP runs exact GELU with QuickGELU-trained weights (its
            `model/clip.py::create_model` builds `nn.GELU`); True uses QuickGELU as OpenAI
            trained it.
    """
    if model_name == TINY:
        model = tiny_clip(img_size=img_size or 64, quick_gelu=quick_gelu)
    else:
        check_model_name(model_name)
        if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
            raise ConfigError(f"--pretrained file {pretrained} does not exist")
        check_weights(model_name, pretrained)
        logger.info("loading %s (%s) at %s px", model_name, pretrained or "random", img_size)

        # open_clip logs its own error on the root logger before raising; ours is the one line.
        def quiet(record: logging.LogRecord) -> bool:
            return "open_clip" not in record.pathname

        logging.getLogger().addFilter(quiet)
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=pretrained or None,
                force_image_size=img_size,
                force_quick_gelu=quick_gelu,
            )
        except Exception as error:  # no network, an empty hub cache, a foreign weights file
            raise ConfigError(_weights_hint(model_name, pretrained, error)) from error
        finally:
            logging.getLogger().removeFilter(quiet)
    freeze(model)
    return model.to(device)


def check_model_name(model_name: str) -> None:
    """`tiny` or an open_clip model; else one line with the three closest names."""
    available = open_clip.list_models()
    if model_name != TINY and model_name not in available:
        hint = did_you_mean(model_name, [TINY, *available], "open_clip.list_models() lists all")
        raise ConfigError(f"unknown --model_name {model_name!r}{hint}")


def check_weights(model_name: str, pretrained: str | None, timeout: float = 3.0) -> None:
    """Before a run writes anything: the weights `load_clip` will need can be had, from a local
    file, the Hugging Face cache, or the network (one connection attempt of `timeout` s);
    otherwise the one-line hint at once, not after a minute of download retries."""
    check_model_name(model_name)
    if model_name == TINY or not pretrained or Path(pretrained).suffix:
        return  # no weights, or a local file (load_clip checks it)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return  # the user promises a cache; open_clip reads it without the network
    config = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    repo = (config.get("hf_hub") or "").strip("/")
    if repo:
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(huggingface_hub.try_to_load_from_cache(repo, name), str):
                return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise ConfigError(_weights_hint(model_name, pretrained, error)) from None


def _weights_hint(model_name: str, pretrained: str | None, error: Exception) -> str:
    """One sentence on a failed weight load that says how to place the weights."""
    kind = type(error).__name__
    if pretrained and Path(pretrained).is_file():
        return f"--pretrained {pretrained} is not a {model_name} file open_clip reads ({kind})"
    return (
        f"cannot get the {pretrained!r} weights of {model_name} ({kind}: no network or no cached "
        "copy); open_clip downloads them once into ~/.cache/huggingface (copy that folder to this "
        "machine and set HF_HUB_OFFLINE=1), or pass --pretrained /path/to/ViT-L-14-336px.pt "
        "(OpenAI's file)"
    )


def freeze(model: nn.Module) -> nn.Module:
    """The one place the backbone is frozen: no gradients, eval mode (no dropout)."""
    model.requires_grad_(False)
    model.eval()
    return model


@functools.cache
def get_tokenizer() -> Callable[[list[str]], torch.Tensor]:
    """OpenAI CLIP's BPE tokenizer: list of N strings -> `[N, 77]` int64 ids (built once; its
    factory's INFO lines about the ViT-L-14-336 config it reads are not ours to log)."""
    factory = logging.getLogger()

    def quiet(record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname

    factory.addFilter(quiet)
    try:
        return open_clip.get_tokenizer(TOKENIZER_NAME)
    finally:
        factory.removeFilter(quiet)


def vision_width(clip: CLIP) -> int:
    return clip.visual.transformer.width


def text_width(clip: CLIP) -> int:
    return clip.transformer.width


def embed_dim(clip: CLIP) -> int:
    return clip.visual.proj.shape[1]


def num_vision_blocks(clip: CLIP) -> int:
    return len(clip.visual.transformer.resblocks)


def num_text_blocks(clip: CLIP) -> int:
    return len(clip.transformer.resblocks)


def image_size(clip: CLIP) -> int:
    return clip.visual.image_size[0]


def grid_size(clip: CLIP) -> int:
    return clip.visual.grid_size[0]


# --------------------------------------------------------------------------------------------
# Attention variants run inside a frozen block


def fused_attention(
    block: nn.Module, h: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Standard multi-head attention with the block's own weights, through fused SDPA.

    The same maths as the block's `nn.MultiheadAttention`, without its batch-first transposes:
    under CPU bf16 autocast the in-projection of that transposed tensor falls into a slow
    copy-bound path (20x slower than fp32 at batch 2 on ViT-L).

    h: `[B, L, D]` (already `ln_1`-normalised) -> `[B, L, D]`.
    """
    attn = block.attn
    batch, length, width = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3D]
    qkv = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # [3,B,H,L,hd]
    if attn_mask is not None:
        attn_mask = attn_mask.to(qkv.dtype)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))  # [B, L, D]


def value_value_attention(block: nn.Module, h: torch.Tensor, per_image: bool) -> torch.Tensor:
    """CLIP-Surgery/DPAM value-value attention with the block's own frozen weights.

    q and k are discarded; each head attends v against itself (scale head_dim^-0.5), then
    `out_proj`. `per_image=False` reproduces AA-CLIP's quirk (the attention its
    `visual.DAPM_replace` installs): the original fed a sequence-first tensor to a batch-first
    module, so the softmax runs over the *batch* axis at every token position and images of a
    batch mix; `per_image=True` attends over the tokens of each image, as CLIP Surgery intended.

    h: `[B, L, D]` (already `ln_1`-normalised) -> `[B, L, D]`.
    """
    attn = block.attn
    batch, length, width = h.shape
    heads = attn.num_heads
    weight_v = attn.in_proj_weight[2 * width :]
    bias_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    v = F.linear(h, weight_v, bias_v).view(batch, length, heads, width // heads)  # [B, L, H, hd]
    if per_image:
        v = v.transpose(1, 2)  # [B, H, L, hd]
        out = F.scaled_dot_product_attention(v, v, v).transpose(1, 2)  # [B, L, H, hd]
    else:
        v = v.permute(1, 2, 0, 3)  # [L, H, B, hd]: softmax over the batch axis
        out = F.scaled_dot_product_attention(v, v, v).permute(2, 0, 1, 3)  # [B, L, H, hd]
    return attn.out_proj(out.reshape(batch, length, width))  # [B, L, D]


def weights_returning_attention(
    block: nn.Module, h: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Standard attention through the slow path that also materialises the attention weights.

    The original AA-CLIP walks blocks this way (`need_weights=True`); kept only for benchmarks,
    it computes the same values as the fused path (the text tower's causal mask included).
    h: `[B, L, D]` -> `[B, L, D]`.
    """
    attended, _ = block.attn(
        h, h, h, need_weights=True, attn_mask=attn_mask, average_attn_weights=False
    )
    return attended


def run_block(
    block: nn.Module,
    x: torch.Tensor,
    attention: str = "standard",
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One residual block (`x + attn(ln_1(x))`, `x + mlp(ln_2(x))`) with a chosen attention rule.

    `standard` is the block's own attention through fused SDPA (`fused_attention`).
    x: `[B, L, D]` -> `[B, L, D]`.
    """
    h = block.ln_1(x)
    if attention == "standard":
        attended = fused_attention(block, h, attn_mask)
    elif attention == "vv_batch_mix":
        attended = value_value_attention(block, h, per_image=False)
    elif attention == "vv_per_image":
        attended = value_value_attention(block, h, per_image=True)
    elif attention == "weights_returning":
        attended = weights_returning_attention(block, h, attn_mask)
    else:
        raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTION_MODES}")
    x = x + block.ls_1(attended)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


# --------------------------------------------------------------------------------------------
# Walkers


def vision_embed(clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """Patch, class and positional embeddings, `ln_pre`. `[B, 3, S, S]` -> `[B, 1+g², D_v]`."""
    return clip.visual._embeds(images)


def walk_vision(
    clip: CLIP,
    x: torch.Tensor,
    hook: BlockHook | None = None,
    attention: Callable[[int], str] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Run vision blocks `start..stop-1` (0-based) on embedded tokens.

    After block i, `hook(i, x)` may record `x` or return a replacement (adapters write back into
    the residual stream this way). `attention(i)` picks the attention rule of block i.

    x: `[B, L, D_v]` -> `[B, L, D_v]`.
    """
    blocks = clip.visual.transformer.resblocks
    stop = len(blocks) if stop is None else stop
    for index in range(start, stop):
        rule = attention(index) if attention is not None else "standard"
        x = run_block(blocks[index], x, attention=rule)
        if hook is not None:
            x = hook(index, x)
    return x


def vision_pool(clip: CLIP, x: torch.Tensor) -> torch.Tensor:
    """Final tokens -> image embedding, as `encode_image`. `[B, L, D_v]` -> `[B, D]`."""
    pooled, _ = clip.visual._pool(x)
    return pooled @ clip.visual.proj


def post_norm(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`ln_post` on any tokens `[..., D_v]`."""
    return clip.visual.ln_post(tokens)


def project_image_tokens(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`ln_post` then the frozen projection into the joint space. `[..., D_v]` -> `[..., D]`."""
    return clip.visual.ln_post(tokens) @ clip.visual.proj


def text_embed(clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
    """Token + positional embeddings. `[N, 77]` ids -> `[N, 77, D_t]`."""
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(token_ids).to(cast_dtype)
    return x + clip.positional_embedding.to(cast_dtype)


def walk_text(
    clip: CLIP, x: torch.Tensor, hook: BlockHook | None = None, stop: int | None = None
) -> torch.Tensor:
    """Text blocks `0..stop-1` (all by default) with the causal mask; `hook(i, x)` after block i.

    x: `[N, 77, D_t]` -> `[N, 77, D_t]`.
    """
    blocks = clip.transformer.resblocks
    for index in range(len(blocks) if stop is None else stop):
        x = run_block(blocks[index], x, attn_mask=clip.attn_mask)
        if hook is not None:
            x = hook(index, x)
    return x


def text_pool(clip: CLIP, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`ln_final`, then the end-of-text token (largest id). `[N, 77, D_t]` -> `[N, D_t]`."""
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]


def text_project(clip: CLIP, pooled: torch.Tensor) -> torch.Tensor:
    """CLIP's frozen text projection. `[N, D_t]` -> `[N, D]`."""
    return pooled @ clip.text_projection


# --------------------------------------------------------------------------------------------
# SOWA: a block's frozen attention weights, projection without ln_post, learnable prompt contexts


class AttentionWeights(NamedTuple):
    """The frozen tensors of a vision block's attention (the block's own, not copies)."""

    in_proj_weight: torch.Tensor  # [3 D_v, D_v]: rows q, k, v
    in_proj_bias: torch.Tensor | None  # [3 D_v]
    out_proj_weight: torch.Tensor  # [D_v, D_v]
    out_proj_bias: torch.Tensor | None  # [D_v]


def vision_attention_weights(clip: CLIP, index: int) -> AttentionWeights:
    """Attention weights of vision block `index` (0-based)."""
    attn = clip.visual.transformer.resblocks[index].attn
    return AttentionWeights(
        attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias
    )


def project_tokens(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """The frozen projection alone (no `ln_post`). `[..., D_v]` -> `[..., D]`."""
    return tokens @ clip.visual.proj


def text_embed_with_context(
    clip: CLIP, token_ids: torch.Tensor, context: torch.Tensor, start: int = 1
) -> torch.Tensor:
    """`text_embed` with the token embeddings at positions `start..start+n-1` replaced by
    learnable contexts (CoOp). ids `[N, 77]`, context `[N, n, D_t]` -> `[N, 77, D_t]`."""
    cast_dtype = clip.transformer.get_cast_dtype()
    tokens = clip.token_embedding(token_ids).to(cast_dtype)
    end = start + context.shape[1]
    x = torch.cat([tokens[:, :start], context.to(cast_dtype), tokens[:, end:]], dim=1)
    return x + clip.positional_embedding.to(cast_dtype)
