"""SOWA: Adapting Hierarchical Frozen Window Self-Attention to Visual-Language Models for Better
Anomaly Detection (Hu & Zhang, arXiv 2407.03634). Spec: specs/sowa.md (the HFWA configuration).

Original code: github.com/huzongxiang/sowa @ d1898ab (`AnomalyCLIP`, config `sowa_hfwa.yaml`). The
raw residual stream after the hooked vision blocks (0-based 5, 11, 17, 23) goes, in parallel and
without feeding back into CLIP, through one window-attention adapter per stage (HFWA) built on that
block's own frozen attention weights; the adapted tokens are projected into the joint space and
compared with learnable-context prompts ("X X ... object." / "X X ... damaged object."). Stage maps
are summed and smoothed; with a k-shot memory the nearest-neighbour distance of each patch to the
support images' patches is added.

Quirks of the original reproduced by default (spec §12), each with the setting that corrects it:
* Every stage has its own adapter, whatever `share_weight` says (§12.1): nothing to set.
* The adapter runs CLIP's frozen `in_proj_weight` without `in_proj_bias` and without `ln_1` on
  the raw residual stream (§12.2); `in_proj_bias=True` adds the bias.
* 8 heads of width/8 channels, not CLIP's own heads (§12.4); `num_heads` sets them.
* Patch tokens skip `ln_post` before the projection (§12.5); `patch_ln_post=True` applies it.
* The image CE loss runs on softmax probabilities, a double softmax (§12.6);
  `ce_on_probabilities=False` (train_sowa `--no-ce_on_probabilities`) runs it on the logits.
* Stage maps are summed, not averaged (§12.9); `stage_reduce="mean"` averages them.
* The k-shot memory holds raw, un-adapted tokens (§12.10); `memory_features="adapted"` uses the
  adapted stage features. The k-shot map is added unsmoothed (§12.10); `smooth_memory_map=True`
  smooths it with the stage maps.
* The test-table image score min-max normalises map maxima over the class's test images
  (transductive, §6): `table_image_scores` only, never `predict`.
Deliberate departures: the support images are drawn with a seed (§12.11, datasets/support.py);
the fusion text Linear is shared and randomly initialised as the original (§12.8, not a flag);
a window that does not divide the grid pads it (the original requires divisibility), and a
window at least as large as the grid becomes one global window, as the original's Swin rule.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from models import backbone
from models.aaclip import AnomalyOutput, clip_from_config
from utils.checkpoint import check_config, load_checkpoint
from utils.errors import CheckpointError, ConfigError, DataError
from utils.forward_utils import calculate_similarity_map
from utils.metrics import minmax_normalize

MODEL_NAME = "sowa"
CLASS_NAMES = ("object",)  # one object-agnostic prompt pair (spec §3)
NORMAL_TEMPLATES = ("{}",)
ANOMALY_TEMPLATES = ("damaged {}",)
LOGIT_SCALE_MAX = math.log(100.0)
SHIFT_MASK_VALUE = -100.0  # Swin's value for pairs from different shifted regions
STAGE_REDUCTIONS = ("sum", "mean")
MEMORY_FEATURES = ("raw", "adapted")
# Settings a checkpoint must share with the model it is loaded into.
CONFIG_KEYS = (
    "model",
    "model_name",
    "quick_gelu",
    "img_size",
    "feature_map_idx",
    "window_size",
    "num_heads",
    "depth",
    "cpb_dim",
    "prompt_length",
    "value_only",
    "in_proj_bias",
    "patch_ln_post",
    "temperature",
)


# --------------------------------------------------------------------------------------------
# Windows (segment-anything's window_partition / window_unpartition, with Swin's ordering)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split a grid into non-overlapping windows, zero-padding the bottom/right if needed.

    x: `[B, H, W, C]` -> (`[B * nW, window², C]` windows row-major over the window grid, tokens
    row-major inside a window; the padded size `(Hp, Wp)`).
    """
    batch, height, width, channels = x.shape
    pad_h, pad_w = -height % window, -width % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)
    return windows, (padded_h, padded_w)


def window_reverse(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`, cropping the padding.

    windows: `[B * nW, window², C]` -> `[B, H, W, C]`.
    """
    padded_h, padded_w = padded_hw
    rows, cols = padded_h // window, padded_w // window
    batch = windows.shape[0] // (rows * cols)
    x = windows.view(batch, rows, cols, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, padded_h, padded_w, -1)
    return x[:, : hw[0], : hw[1]].contiguous()


def relative_coords_table(window: int) -> torch.Tensor:
    """SwinV2 log-spaced relative coordinates `[1, 2w-1, 2w-1, 2]` in about ±1.06 (spec §2.2)."""
    span = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(span, span, indexing="ij"), dim=-1)[None]
    table = table / max(window - 1, 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """`[w², w²]` index into the `(2w-1)²` bias table of token pair (i, j):
    `(h_i - h_j + w - 1)(2w - 1) + (w_i - w_j + w - 1)`."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)  # [2, w²]
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1  # [w²,w²,2]
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def gaussian_filter(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter on each map (mode 'reflect', i.e. edge-repeating, radius
    `int(truncate·σ + 0.5)`), as the original smooths its maps. `[B, H, W]` -> `[B, H, W]`."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    for dim in (1, 2):
        size = maps.shape[dim]
        index = torch.arange(-radius, size + radius, device=maps.device) % (2 * size)
        index = torch.where(index >= size, 2 * size - 1 - index, index)  # d c b a | a b c d
        padded = maps.index_select(dim, index).movedim(dim, -1)  # [B, other, size + 2r]
        shape = padded.shape
        smoothed = F.conv1d(padded.reshape(-1, 1, shape[-1]), kernel.view(1, 1, -1))
        maps = smoothed.view(*shape[:-1], size).movedim(-1, dim)
    return maps


# --------------------------------------------------------------------------------------------
# HFWA adapter (BasicLayer -> SwinTransformerBlock -> WindowAttention, spec §2)


class WindowAttention(nn.Module):
    """SwinV2 cosine window attention on a frozen CLIP block's projections (spec §2.3).

    Trainable: per-head logit scale (init ln 10, capped at ln 100) and the continuous position
    bias MLP. The frozen `in_proj_weight` / `out_proj` are passed to `forward` (they belong to
    CLIP, not to this module). `value_only` compares values with values, as the original.
    """

    def __init__(
        self,
        window: int,
        num_heads: int,
        cpb_dim: int = 64,
        value_only: bool = True,
        in_proj_bias: bool = False,
        attn_drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.value_only = value_only
        self.in_proj_bias = in_proj_bias
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, cpb_dim), nn.ReLU(inplace=True), nn.Linear(cpb_dim, num_heads, bias=False)
        )
        self.attn_drop = nn.Dropout(attn_drop)
        self.register_buffer("relative_coords_table", relative_coords_table(window), False)
        self.register_buffer("relative_position_index", relative_position_index(window), False)

    def position_bias(self) -> torch.Tensor:
        """`16·sigmoid(cpb)` gathered per token pair: `[heads, w², w²]`."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)  # [(2w-1)², h]
        bias = table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window**2, self.window**2, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def qkv(
        self, x: torch.Tensor, weights: backbone.AttentionWeights
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen in-projection split into this module's heads (contiguous channel groups),
        without CLIP's bias unless `in_proj_bias`: x `[B_w, N, D_v]` -> 3 x `[B_w, h, N, D_v/h]`."""
        bias = weights.in_proj_bias if self.in_proj_bias else None
        batch, length, width = x.shape
        qkv = F.linear(x, weights.in_proj_weight, bias)  # [B_w, N, 3 D_v]
        qkv = qkv.view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return q, k, v

    def logits(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits plus position bias, before masks: `[B_w, h, N, N]`
        (V-V when `value_only`, else Q-K)."""
        first, second = (v, v) if self.value_only else (q, k)
        cosine = F.normalize(first, dim=-1) @ F.normalize(second, dim=-1).transpose(-2, -1)
        scale = torch.exp(self.logit_scale.clamp(max=LOGIT_SCALE_MAX))
        return cosine * scale + self.position_bias()

    def forward(
        self,
        x: torch.Tensor,
        weights: backbone.AttentionWeights,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: `[B_w, N, D_v]`, mask `[B_w, N, N]` added to the logits -> `[B_w, N, D_v]`."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x, weights)
        logits = self.logits(q, k, v)  # [B_w, h, N, N]
        if mask is not None:
            logits = logits + mask[:, None].to(logits.dtype)
        attention = self.attn_drop(torch.softmax(logits, dim=-1))
        out = (attention @ v).transpose(1, 2).reshape(batch, length, width)  # un-normalised v
        return F.linear(out, weights.out_proj_weight, weights.out_proj_bias)


class HFWABlock(nn.Module):
    """One Swin block with post-norm (spec §2.3): `Z = X + LN1(attn(X))`, `Z + LN2(Z Wᵀ)`, the
    MLP a single bias-free Linear with no activation."""

    def __init__(
        self,
        width: int,
        window: int,
        num_heads: int,
        shift: int = 0,
        cpb_dim: int = 64,
        value_only: bool = True,
        in_proj_bias: bool = False,
        attn_drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.attn = WindowAttention(window, num_heads, cpb_dim, value_only, in_proj_bias, attn_drop)
        self.norm1 = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width, bias=False)
        self.norm2 = nn.LayerNorm(width)

    def window_mask(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Additive mask `[nW, N, N]`: -100 between Swin's shifted regions, -inf on padded
        keys; None when there is neither shift nor padding."""
        height, width = grid
        padded = (-height % self.window, -width % self.window)
        if not self.shift and not any(padded):
            return None
        padded_h, padded_w = height + padded[0], width + padded[1]
        region = torch.zeros(padded_h, padded_w, device=device)
        if self.shift:
            bounds = (
                slice(0, -self.window),
                slice(-self.window, -self.shift),
                slice(-self.shift, None),
            )
            label = 0
            for rows in bounds:
                for cols in bounds:
                    region[rows, cols] = label
                    label += 1
        valid = torch.zeros(padded_h, padded_w, device=device)
        valid[:height, :width] = 1
        if self.shift:
            valid = torch.roll(valid, (-self.shift, -self.shift), dims=(0, 1))
        maps = torch.stack([region, valid], dim=-1)[None]  # [1, Hp, Wp, 2]
        windows, _ = window_partition(maps, self.window)  # [nW, N, 2]
        region_w, valid_w = windows[..., 0], windows[..., 1]
        mask = (region_w[:, :, None] != region_w[:, None, :]).float() * SHIFT_MASK_VALUE
        return mask.masked_fill(valid_w[:, None, :] == 0, float("-inf"))

    def forward(self, x: torch.Tensor, weights: backbone.AttentionWeights) -> torch.Tensor:
        """x: `[B, H, W, D_v]` raw hooked patch tokens -> `[B, H, W, D_v]`."""
        batch, height, width, channels = x.shape
        shortcut = x
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        windows, padded_hw = window_partition(x, self.window)  # [B * nW, N, D_v]
        mask = self.window_mask((height, width), x.device)
        if mask is not None:
            mask = mask.repeat(batch, 1, 1)
        attended = self.attn(windows, weights, mask)
        attended = window_reverse(attended, self.window, padded_hw, (height, width))
        if self.shift:
            attended = torch.roll(attended, (self.shift, self.shift), dims=(1, 2))
        x = shortcut + self.norm1(attended)
        return x + self.norm2(self.mlp(x))


class HFWAAdapter(nn.Module):
    """`depth` HFWA blocks (shift 0, window/2, 0, ...) on one hooked block's raw patch tokens.

    A window at least as large as the grid becomes one global window without shift (Swin's rule,
    as the original); a smaller window that does not divide the grid pads it.
    """

    def __init__(
        self,
        width: int,
        grid: int,
        window: int = 12,
        num_heads: int = 8,
        depth: int = 1,
        cpb_dim: int = 64,
        value_only: bool = True,
        in_proj_bias: bool = False,
        attn_drop: float = 0.1,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ConfigError(f"--num_heads {num_heads} must divide the vision width {width}")
        global_window = grid <= window
        window = grid if global_window else window
        self.blocks = nn.ModuleList(
            HFWABlock(
                width,
                window,
                num_heads,
                shift=0 if global_window or i % 2 == 0 else window // 2,
                cpb_dim=cpb_dim,
                value_only=value_only,
                in_proj_bias=in_proj_bias,
                attn_drop=attn_drop,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, weights: backbone.AttentionWeights) -> torch.Tensor:
        """x: `[B, g², D_v]` -> `[B, g², D_v]`."""
        batch, length, width = x.shape
        side = math.isqrt(length)
        x = x.view(batch, side, side, width)
        for block in self.blocks:
            x = block(x, weights)
        return x.reshape(batch, length, width)


# --------------------------------------------------------------------------------------------
# Prompts (AnomalyPromptLearner, spec §3)


class PromptLearner(nn.Module):
    """DualCoOp-style learnable contexts, one set per state: normal `ctx_pos`, anomaly `ctx_neg`,
    each `[M, K, n, D_t]` (M class names, K templates, n = `prompt_length`), N(0, 0.02²)."""

    def __init__(self, clip: CLIP, prompt_length: int = 12) -> None:
        super().__init__()
        width = backbone.text_width(clip)
        placeholder = " ".join(["X"] * prompt_length)
        sentences = [
            f"{placeholder} {template.format(name)}."
            for templates in (NORMAL_TEMPLATES, ANOMALY_TEMPLATES)
            for name in CLASS_NAMES
            for template in templates
        ]
        token_ids = backbone.get_tokenizer()(sentences)  # [2 M K, 77]
        if int(token_ids.argmax(dim=-1).max()) >= token_ids.shape[1] - 1:
            raise ConfigError(f"--prompt_length {prompt_length} leaves no room in 77 tokens")
        self.prompt_length = prompt_length
        self.register_buffer("token_ids", token_ids, persistent=False)
        shape = (len(CLASS_NAMES), len(NORMAL_TEMPLATES), prompt_length, width)
        self.ctx_pos = nn.Parameter(torch.randn(shape) * 0.02)
        self.ctx_neg = nn.Parameter(torch.randn(shape) * 0.02)

    def forward(self) -> torch.Tensor:
        """Contexts in prompt order (normal block, then anomaly block): `[2 M K, n, D_t]`."""
        return torch.cat([self.ctx_pos.flatten(0, 1), self.ctx_neg.flatten(0, 1)])


# --------------------------------------------------------------------------------------------
# Model


class SOWAOutput(NamedTuple):
    """The training forward (spec §4)."""

    text_probs: torch.Tensor  # [B, 2] softmax(cos / T), float32
    text_logits: torch.Tensor  # [B, 2] cos / T, float32
    stage_probs: list[torch.Tensor]  # per stage [B, 2, S, S] pixel softmax, float32
    raw_patches: list[torch.Tensor]  # per stage [B, g², D] hooked tokens @ proj (no adapter)
    stage_features: list[torch.Tensor]  # per stage [B, g², D] adapted tokens @ proj


class SOWA(nn.Module):
    """Frozen CLIP with one HFWA adapter per hooked block, learnable prompts and a text Linear.

    Args:
        clip_model: a plain open_clip CLIP (frozen here).
        feature_map_idx: 0-based vision blocks whose outputs are adapted (increasing).
        window_size: adapter window side in tokens.
        num_heads: adapter heads (must divide the vision width).
        depth: HFWA blocks per stage.
        cpb_dim: hidden width of the position-bias MLP.
        prompt_length: learnable context tokens per prompt.
        temperature: T of the image softmax.
        attn_drop: adapter attention dropout (training only).
        smoothing_sigma: test-time Gaussian σ in pixels on the stage-map sum (0: none).
    """

    def __init__(
        self,
        clip_model: CLIP,
        feature_map_idx: list[int] | tuple[int, ...] = (5, 11, 17, 23),
        window_size: int = 12,
        num_heads: int = 8,
        depth: int = 1,
        cpb_dim: int = 64,
        prompt_length: int = 12,
        value_only: bool = True,
        in_proj_bias: bool = False,
        patch_ln_post: bool = False,
        temperature: float = 0.07,
        attn_drop: float = 0.1,
        stage_reduce: str = "sum",
        memory_features: str = "raw",
        smooth_memory_map: bool = False,
        smoothing_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        blocks = backbone.num_vision_blocks(clip_model)
        hooks = list(feature_map_idx)
        if not hooks or sorted(set(hooks)) != hooks or hooks[0] < 0 or hooks[-1] >= blocks:
            msg = f"--feature_map_idx {hooks} must be increasing 0-based indices < {blocks}"
            raise ConfigError(msg)
        if window_size < 1 or depth < 1 or prompt_length < 1 or temperature <= 0:
            msg = "--window_size, --depth and --prompt_length must be >= 1 and --temperature > 0"
            raise ConfigError(msg)
        if stage_reduce not in STAGE_REDUCTIONS or memory_features not in MEMORY_FEATURES:
            msg = f"stage_reduce in {STAGE_REDUCTIONS}, memory_features in {MEMORY_FEATURES}"
            raise ConfigError(msg)
        self.clipmodel = backbone.freeze(clip_model)
        self.feature_map_idx = hooks
        self.patch_ln_post = patch_ln_post
        self.temperature = temperature
        self.stage_reduce = stage_reduce
        self.memory_features = memory_features
        self.smooth_memory_map = smooth_memory_map
        self.smoothing_sigma = smoothing_sigma
        width = backbone.vision_width(clip_model)
        grid = backbone.grid_size(clip_model)
        self.adapters = nn.ModuleList(
            HFWAAdapter(
                width,
                grid,
                window_size,
                num_heads,
                depth,
                cpb_dim,
                value_only,
                in_proj_bias,
                attn_drop,
            )
            for _ in hooks
        )
        self.prompt_learner = PromptLearner(clip_model, prompt_length)
        dim = backbone.embed_dim(clip_model)
        self.text_linear = nn.Linear(dim, dim)  # FusionModule's, default init (§12.8)
        self.memory: list[torch.Tensor] | None = None

    def train(self, mode: bool = True) -> SOWA:
        super().train(mode)
        self.clipmodel.eval()
        return self

    @property
    def img_size(self) -> int:
        return backbone.image_size(self.clipmodel)

    @property
    def device(self) -> torch.device:
        return self.clipmodel.visual.proj.device

    @property
    def smoothing(self) -> str:
        """How test-time maps are smoothed (recorded with the results)."""
        stages = f"{self.stage_reduce} of stage maps"
        if self.smoothing_sigma <= 0:
            return f"none on the {stages} (SOWA)"
        memory = "smoothed with it" if self.smooth_memory_map else "added unsmoothed"
        return (
            f"gaussian sigma {self.smoothing_sigma:g} px (scipy reflect) on the {stages}; "
            f"k-shot map {memory} (SOWA)"
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters, prompt contexts and the text Linear (no CLIP)."""
        return {
            key: value
            for key, value in self.state_dict().items()
            if not key.startswith("clipmodel.")
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load `trainable_state_dict` output; missing, unexpected or mis-shaped keys raise
        RuntimeError."""
        result = self.load_state_dict(state, strict=False)
        missing = [key for key in result.missing_keys if not key.startswith("clipmodel.")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing keys {missing}, unexpected keys {result.unexpected_keys}")

    # ---------------------------------------------------------------------------------------

    def encode_text(self) -> torch.Tensor:
        """Prompt features through the frozen text tower and the text Linear, pooled over
        templates: `[M, 2, D]` (channel 0 normal, 1 anomaly), not normalised."""
        clip = self.clipmodel
        token_ids = self.prompt_learner.token_ids
        x = backbone.text_embed_with_context(clip, token_ids, self.prompt_learner(), start=1)
        x = backbone.walk_text(clip, x)
        features = backbone.text_project(clip, backbone.text_pool(clip, x, token_ids))
        features = self.text_linear(features)  # [2 M K, D]
        classes, templates = len(CLASS_NAMES), len(NORMAL_TEMPLATES)
        features = features.view(2, classes, templates, -1).mean(dim=2)  # [2, M, D]
        return features.permute(1, 0, 2)

    @torch.no_grad()
    def hooked_tokens(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One frozen pass: raw patch tokens after each hooked block (no CLS, no `ln_post`), one
        `[B, g², D_v]` per stage, and the global embedding `[B, D]` (`encode_image`)."""
        clip = self.clipmodel
        hooked: list[torch.Tensor] = []

        def record(index: int, x: torch.Tensor) -> torch.Tensor:
            if index in self.feature_map_idx:
                hooked.append(x[:, 1:])
            return x

        x = backbone.walk_vision(clip, backbone.vision_embed(clip, images), record)
        return hooked, backbone.vision_pool(clip, x)

    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens into the joint space, without `ln_post` (quirk) unless `patch_ln_post`.
        `[B, L, D_v]` -> `[B, L, D]`."""
        if self.patch_ln_post:
            return backbone.project_image_tokens(self.clipmodel, tokens)
        return backbone.project_tokens(self.clipmodel, tokens)

    def encode_image(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(global embedding `[B, D]`, raw patches, adapted stage features: `[B, g², D]` each)."""
        hooked, global_embedding = self.hooked_tokens(images)
        raw_patches, stage_features = [], []
        for adapter, index, tokens in zip(self.adapters, self.feature_map_idx, hooked, strict=True):
            weights = backbone.vision_attention_weights(self.clipmodel, index)
            raw_patches.append(self.project_patches(tokens))
            stage_features.append(self.project_patches(adapter(tokens, weights)))
        return global_embedding, raw_patches, stage_features

    def forward(self, images: torch.Tensor) -> SOWAOutput:
        """images `[B, 3, S, S]` -> text probabilities and per-stage pixel probabilities."""
        global_embedding, raw_patches, stage_features = self.encode_image(images)
        text = self.encode_text()[0]  # [2, D]: every class uses the "object" row (§3)
        with torch.autocast(images.device.type, enabled=False):
            text = F.normalize(text.float(), dim=-1)
            image = F.normalize(global_embedding.float(), dim=-1)
            text_logits = image @ text.T / self.temperature  # [B, 2]
            anchors = text.T.expand(len(images), -1, -1)  # [B, D, 2]
            stage_probs = [
                calculate_similarity_map(
                    F.normalize(features.float(), dim=-1), anchors, self.img_size, scale=1.0
                )
                for features in stage_features
            ]  # each [B, 2, S, S]: bilinear on raw cosines, then softmax without temperature
        return SOWAOutput(
            torch.softmax(text_logits, dim=-1),
            text_logits,
            stage_probs,
            raw_patches,
            stage_features,
        )

    # ---------------------------------------------------------------------------------------
    # Few-shot memory (spec §6)

    @torch.no_grad()
    def set_memory(self, support_images: torch.Tensor | None) -> None:
        """Store the support images' per-stage patch features (raw tokens @ proj by default) for
        the class being evaluated; None clears it. support_images: `[k, 3, S, S]`."""
        if support_images is None:
            self.memory = None
            return
        if support_images.ndim != 4 or support_images.shape[0] < 1:
            shape = tuple(support_images.shape)
            raise DataError(f"support images have shape {shape}; expected [k, 3, S, S], k >= 1")
        _, raw_patches, stage_features = self.encode_image(support_images.to(self.device))
        features = raw_patches if self.memory_features == "raw" else stage_features
        self.memory = [F.normalize(f.float().flatten(0, 1), dim=-1) for f in features]  # [kL, D]

    def memory_map(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Sum over stages of each patch's cosine distance to its nearest memory patch,
        upsampled bilinearly (align_corners) to the input: `[B, S, S]`, each stage in [0, 2].
        features: per stage `[B, g², D]` (same kind as the memory)."""
        if self.memory is None:
            raise DataError("no support memory is set; call set_memory(support_images) first")
        total = 0.0
        for queries, memory in zip(features, self.memory, strict=True):
            queries = F.normalize(queries.float(), dim=-1)  # [B, L, D]
            distance = (1 - queries @ memory.T).min(dim=-1).values  # [B, L]
            side = math.isqrt(distance.shape[1])
            grid = distance.view(-1, 1, side, side)
            total = (
                total
                + F.interpolate(grid, size=self.img_size, mode="bilinear", align_corners=True)[:, 0]
            )
        return total

    # ---------------------------------------------------------------------------------------
    # Inference

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: list[str]) -> AnomalyOutput:
        """Anomaly map `[B, S, S]` and image score `[B]` (spec §4, §6).

        Map: Σ over stages of the anomaly probability (`stage_reduce`), Gaussian-smoothed, plus
        the unsmoothed k-shot map when a memory is set. Score: the image softmax's anomaly
        probability. `class_names` must match the batch; SOWA's prompts ignore them (§3).
        """
        if len(class_names) != len(images):
            raise DataError(
                f"{len(class_names)} class names for {len(images)} images; pass one each"
            )
        output = self(images)
        with torch.autocast(images.device.type, enabled=False):
            anomaly = torch.stack([probs[:, 1] for probs in output.stage_probs])  # [N, B, S, S]
            anomaly_map = anomaly.sum(0) if self.stage_reduce == "sum" else anomaly.mean(0)
            if self.memory is not None:
                features = (
                    output.raw_patches if self.memory_features == "raw" else output.stage_features
                )
                memory_map = self.memory_map(features)
                if self.smooth_memory_map:
                    anomaly_map = anomaly_map + memory_map
            if self.smoothing_sigma > 0:
                anomaly_map = gaussian_filter(anomaly_map, self.smoothing_sigma)
            if self.memory is not None and not self.smooth_memory_map:
                anomaly_map = anomaly_map + memory_map  # unsmoothed, unweighted (§12.10)
        return AnomalyOutput(anomaly_map, output.text_probs[:, 1])

    def table_image_scores(self, maps: np.ndarray, scores: np.ndarray, domain: str) -> np.ndarray:
        """Paper-table image scores of one class from `predict`'s maps `[N, S, S]` and scores `[N]`.

        Zero-shot: the image softmax's anomaly probability. With a memory set (k-shot):
        `0.5 (score + minmax(map max))`, min-max over the class's test images (transductive).
        """
        scores = np.asarray(scores, dtype=np.float64)
        if self.memory is None:
            return scores
        maxima = np.asarray(maps, dtype=np.float64).reshape(len(scores), -1).max(axis=1)
        return 0.5 * (scores + minmax_normalize(maxima))


def sowa_settings(config: dict) -> dict:
    """SOWA's constructor arguments from a run config (CLI args or a checkpoint's config)."""
    return {
        "feature_map_idx": config["feature_map_idx"],
        "window_size": config["window_size"],
        "num_heads": config["num_heads"],
        "depth": config.get("depth", 1),
        "cpb_dim": config.get("cpb_dim", 64),
        "prompt_length": config["prompt_length"],
        "value_only": config.get("value_only", True),
        "in_proj_bias": config.get("in_proj_bias", False),
        "patch_ln_post": config.get("patch_ln_post", False),
        "temperature": config.get("temperature", 0.07),
        "attn_drop": config.get("attn_drop", 0.1),
        "stage_reduce": config.get("stage_reduce", "sum"),
        "memory_features": config.get("memory_features", "raw"),
        "smooth_memory_map": config.get("smooth_memory_map", False),
        "smoothing_sigma": config.get("smoothing_sigma", 4.0),
    }


def build_sowa(config: dict, device: torch.device | str = "cpu") -> SOWA:
    """SOWA from a run config (`model_name`, `pretrained`, `img_size`, `quick_gelu`, ...)."""
    return SOWA(clip_from_config(config, device), **sowa_settings(config)).to(device)


def load_sowa_state(model: SOWA, path: Path, payload: dict, config: dict) -> None:
    """Check a checkpoint's config against `config` (naming the first differing setting), then
    load its trainable weights into `model`."""
    check_config(path, payload.get("config"), {"model": MODEL_NAME, **config}, CONFIG_KEYS)
    if MODEL_NAME not in payload:
        raise CheckpointError(f"{path} holds no SOWA weights (keys: {sorted(payload)})")
    try:
        model.load_trainable_state_dict(payload[MODEL_NAME])
    except RuntimeError as error:
        msg = f"{path} has SOWA weights of another shape; check --model_name and --feature_map_idx"
        raise CheckpointError(msg) from error


def from_checkpoint(
    path: Path, device: torch.device | str = "cpu", overrides: dict | None = None
) -> tuple[SOWA, dict]:
    """SOWA rebuilt from `sowa*.pth` and its stored config. `overrides` may change test-time
    settings (`smoothing_sigma`, `stage_reduce`, `memory_features`, `smooth_memory_map`,
    `pretrained`); one that changes the architecture fails with the setting named.
    Returns (model in eval mode, payload)."""
    path = Path(path)
    payload = load_checkpoint(path)
    saved = payload.get("config")
    check_config(path, saved, {"model": MODEL_NAME}, ("model",))
    if not saved or "feature_map_idx" not in saved:
        model = (saved or {}).get("model", "unknown")
        raise CheckpointError(f"{path} is not a SOWA checkpoint (model {model!r})")
    config = {**saved, **(overrides or {})}
    model = build_sowa(config, device)
    load_sowa_state(model, path, payload, config)
    return model.eval(), payload
