"""SOWA: Adapting Hierarchical Frozen Window Self-Attention to Visual-Language Models for Better
Anomaly Detection (Hu & Zhang, arXiv 2407.03634), in its HFWA configuration.

Original code: github.com/huzongxiang/sowa @ d1898ab (`AnomalyCLIP`, config `sowa_hfwa.yaml`). The
raw residual stream after the hooked vision blocks (`block_indices`, 0-based 5, 11, 17, 23; the
original's name `feature_map_idx` is an alias) goes, in parallel and
without feeding back into CLIP, through one window-attention adapter per stage (HFWA) built on that
block's own frozen attention weights; the adapted tokens are projected into the joint space and
compared with learnable-context prompts ("X X ... object." / "X X ... damaged object."). Stage maps
are summed and smoothed; with a k-shot memory the nearest-neighbour distance of each patch to the
support images' patches is added. Image labels alone: the image CE trains on every image; the
stages' focal + dice skip, per sample, the anomalous images without a mask.

Quirks of the original reproduced by default, each with the setting that corrects it:
* Every stage has its own adapter, whatever `share_weight` says (`VisionMapEncoder` builds one
  `BasicLayer` per hooked block from the adapter partial): nothing to set.
* The adapter runs CLIP's frozen `in_proj_weight` without `in_proj_bias` and without `ln_1` on
  the raw residual stream (`WindowAttention`); `in_proj_bias=True` adds the bias.
* 8 heads of width/8 channels, not CLIP's own heads (`sowa_hfwa.yaml`); `num_heads` sets them.
* Patch tokens skip `ln_post` before the projection; `patch_ln_post=True` applies it.
* The image CE loss runs on softmax probabilities, a double softmax (`AnomalyCLIP.forward`
  returns softmaxed `text_probs`); `ce_on_probabilities=False` (`--no-ce_on_probabilities`) runs
  it on the logits.
* Stage maps are summed, not averaged; `stage_reduce="mean"` averages them.
* The k-shot memory holds raw, un-adapted tokens; `memory_features="adapted"` uses the adapted
  stage features. The k-shot map is added unsmoothed; `smooth_memory_map=True` smooths it with
  the stage maps.
* The test-table image score min-max normalises map maxima over the class's test images
  (transductive): `table_image_scores` only, never `predict`.
Deliberate departures: the support images are drawn with a seed (the original's `src/eval.py`
never seeds; datasets/support.py); the fusion text Linear is shared and randomly initialised as
the original (not a flag); a window that does not divide the grid pads it (the original requires
divisibility), and a window at least as large as the grid becomes one global window, as the
original's Swin rule.

Training is one stage (`src/models/anomaly_clip_module.py`): `CE(text_probs, y) +
Σ_stages [focal(P_s, m) + dice(P_s[1], m) + dice(P_s[0], 1 - m)]`, all weights 1; AdamW over
every trainable parameter in one group (weight decay reaches LayerNorms, logit scales and
contexts, as the original), with ReduceLROnPlateau (factor 0.1, patience 5) on the epoch loss,
which cannot act within the default single epoch.
The original's MVTec mosaic augmentation is not reproduced (`--augment` selects the project's
geometric augmentation; off by default, as the original for VisA).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from models import backbone
from models.base import (
    AnomalyOutput,
    ClipConfig,
    FrozenCLIPModel,
    MapExtrema,
    SingleStageConfig,
    Stage,
)
from models.forward_utils import (
    calculate_seg_loss,
    calculate_similarity_map,
    gaussian_smooth,
    known_masks,
    minmax_normalize,
    pixel_loss,
)
from utils.core.config import ARCH, TEST, redefault, setting
from utils.core.errors import ConfigError, DataError
from utils.core.runtime import float32_island

CLASS_NAMES = ("object",)  # one object-agnostic prompt pair
NORMAL_TEMPLATES = ("{}",)
ANOMALY_TEMPLATES = ("damaged {}",)
LOGIT_SCALE_MAX = math.log(100.0)
SHIFT_MASK_VALUE = -100.0  # Swin's value for pairs from different shifted regions
STAGE_REDUCTIONS = ("sum", "mean")
MEMORY_FEATURES = ("raw", "adapted")


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
    """SwinV2 log-spaced relative coordinates `[1, 2w-1, 2w-1, 2]` in about ±1.06, as the
    original's."""
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


# --------------------------------------------------------------------------------------------
# HFWA adapter (BasicLayer -> SwinTransformerBlock -> WindowAttention, the original's
# src/models/components/adapter.py)


class WindowAttention(nn.Module):
    """SwinV2 cosine window attention on a frozen CLIP block's projections, as the original's.

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
    """One Swin block with post-norm, as the original's `SwinTransformerBlock`:
    `Z = X + LN1(attn(X))`, `Z + LN2(Z Wᵀ)`, the MLP a single bias-free Linear with no
    activation."""

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
# Prompts (the original's AnomalyPromptLearner, src/models/components/coop.py)


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
    """The training forward (the original's `AnomalyCLIP.forward`)."""

    text_probs: torch.Tensor  # [B, 2] softmax(cos / T), float32
    text_logits: torch.Tensor  # [B, 2] cos / T, float32
    stage_probs: list[torch.Tensor]  # per stage [B, 2, S, S] pixel softmax, float32
    raw_patches: list[torch.Tensor]  # per stage [B, g², D] hooked tokens @ proj (no adapter)
    stage_features: list[torch.Tensor]  # per stage [B, g², D] adapted tokens @ proj


@dataclasses.dataclass
class SOWAConfig(SingleStageConfig):
    """SOWA's settings: the original's HFWA configuration (configs/model/sowa_hfwa.yaml) and
    training defaults."""

    name: ClassVar[str] = "sowa"
    paper_img_size: ClassVar[int] = 336
    run_defaults: ClassVar[dict[str, Any]] = {
        "save_path": Path("ckpt/sowa"),
        "seed": 2025,  # the original's train.py seed
        "augment": False,  # the original: no augmentation for VisA (MVTec mosaic not reproduced)
        # The paper/original trains on the whole test split of the auxiliary data set.
        "training_mode": "full_shot",
    }

    quick_gelu: bool = redefault(ClipConfig, "quick_gelu", True)  # the original's OpenAI CLIP
    # The original's MaskTransform: bilinear (torchvision's default), training > 0, test > 0.5.
    mask_resize: str = redefault(ClipConfig, "mask_resize", "bilinear")
    test_mask_threshold: float = redefault(ClipConfig, "test_mask_threshold", 0.5)
    block_indices: list[int] = redefault(
        ClipConfig,
        "block_indices",
        [5, 11, 17, 23],
        help="0-based vision blocks whose outputs are adapted (H1..H4: the outputs of blocks 6, "
        "12, 18, 24)",
        aliases={"feature_map_idx": 0},
        original="feature_map_idx",
    )
    window_size: int = setting(
        12, "adapter window in tokens (>= the grid: one global window)", kind=ARCH, minimum=1
    )
    num_heads: int = setting(8, "adapter heads; must divide the vision width", kind=ARCH, minimum=1)
    depth: int = setting(1, "HFWA blocks per stage", kind=ARCH, minimum=1)
    cpb_dim: int = setting(64, "width of the position-bias MLP", kind=ARCH, minimum=1)
    prompt_length: int = setting(12, "learnable context tokens per prompt", kind=ARCH, minimum=1)
    value_only: bool = setting(
        True, "value-value cosine attention (the original); no: query-key", kind=ARCH
    )
    in_proj_bias: bool = setting(
        False, "use the block's in_proj_bias in the adapter (the original does not)", kind=ARCH
    )
    patch_ln_post: bool = setting(
        False, "ln_post on patch tokens before the projection (the original skips it)", kind=ARCH
    )
    temperature: float = setting(0.07, "T of the image softmax", kind=ARCH, above=0)
    stage_reduce: str = setting(
        "sum",
        "reduction of the stage maps (the original sums)",
        kind=TEST,
        choices=STAGE_REDUCTIONS,
    )
    memory_features: str = setting(
        "raw",
        "k-shot memory on raw hooked tokens (the original) or adapted features",
        kind=TEST,
        choices=MEMORY_FEATURES,
    )
    smooth_memory_map: bool = setting(
        False,
        "smooth the k-shot map with the stage maps (the original adds it unsmoothed)",
        kind=TEST,
    )
    smoothing_sigma: float = setting(
        4.0,
        "test-time Gaussian sigma in pixels on the stage-map sum (0: none)",
        kind=TEST,
        minimum=0,
    )
    attn_drop: float = setting(0.1, "adapter attention dropout (training only)", minimum=0)
    lr: float = setting(1e-3, "AdamW learning rate", above=0)
    weight_decay: float = setting(0.2, "AdamW weight decay", minimum=0)
    ce_on_probabilities: bool = setting(
        True, "image CE on softmaxed probabilities (the original); no: on the logits"
    )

    def check(self) -> None:
        if self.attn_drop >= 1:
            raise ConfigError(f"--attn_drop {self.attn_drop} must be below 1")


# The original's Lightning checkpoint (`epoch_000.ckpt`): `state_dict` under `net.`, the adapters in
# the VisionMapEncoder, each Swin block's single Linear inside `mlp.layers`, the fusion's text
# Linear under `cross_fusion.linear`; the frozen CLIP is saved several times over (not read).
ORIGINAL_KEYS = (
    (
        re.compile(r"^net\.visual_encoder\.adapters\.(\d+)\.blocks\.(\d+)\.mlp\.layers\.0\."),
        r"adapters.\1.blocks.\2.mlp.",
    ),
    (re.compile(r"^net\.visual_encoder\.adapters\."), "adapters."),
    (re.compile(r"^net\.prompt_learner\."), "prompt_learner."),
    (re.compile(r"^net\.cross_fusion\.linear\."), "text_linear."),
)


def _find(tree: Any, key: str) -> Any:
    """The first value under `key` in nested dicts (a Lightning checkpoint's hyper-parameters)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


class SOWA(FrozenCLIPModel):
    """Frozen CLIP with one HFWA adapter per hooked block, learnable prompts and a text Linear
    (settings: `SOWAConfig`)."""

    config_class = SOWAConfig
    checkpoint_file = "sowa.pth"
    log_file = "train_sowa.log"
    supports_memory = True

    @classmethod
    def is_original(cls, payload: dict[str, Any]) -> bool:
        """The original's Lightning checkpoint: the adapters under `state_dict` as `net.`."""
        state = payload.get("state_dict") or {}
        return any(str(key).startswith("net.visual_encoder.") for key in state)

    @classmethod
    def original_settings(
        cls, path: Path, payload: dict[str, Any], trust: bool = False
    ) -> dict[str, Any]:
        """What a Lightning checkpoint's weights (and hyper-parameters, when plain) imply."""
        state = payload.get("state_dict") or {}
        prefix = "net.visual_encoder.adapters."
        blocks = {
            tuple(key[len(prefix) :].split(".")[:3:2]) for key in state if key.startswith(prefix)
        }
        settings: dict[str, Any] = {}
        if blocks:
            settings["depth"] = len({block for _, block in blocks})
        for key, value in state.items():
            if key.startswith(prefix) and key.endswith(".attn.logit_scale"):
                settings["num_heads"] = int(value.shape[0])
            elif key.startswith(prefix) and key.endswith(".attn.cpb_mlp.0.weight"):
                settings["cpb_dim"] = int(value.shape[0])
            elif key.startswith(prefix) and key.endswith(".attn.relative_coords_table"):
                settings["window_size"] = (int(value.shape[1]) + 1) // 2
            elif key == "net.prompt_learner.ctx_pos":
                settings["prompt_length"] = int(value.shape[2])
        hooks = _find(payload.get("hyper_parameters"), "feature_map_idx")
        if hooks is not None:
            settings["block_indices"] = list(hooks)
        return settings

    def from_original(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The original's Lightning checkpoint in our layout."""
        return self.nested_original(payload, "state_dict", ORIGINAL_KEYS)

    def __init__(self, config: SOWAConfig | None = None, clip: CLIP | None = None) -> None:
        config = config if config is not None else SOWAConfig()
        super().__init__(config, clip)
        clip = self.clipmodel
        hooks = config.block_indices
        width = backbone.vision_width(clip)
        grid = backbone.grid_size(clip)
        self.adapters = nn.ModuleList(
            HFWAAdapter(
                width,
                grid,
                config.window_size,
                config.num_heads,
                config.depth,
                config.cpb_dim,
                config.value_only,
                config.in_proj_bias,
                config.attn_drop,
            )
            for _ in hooks
        )
        self.prompt_learner = PromptLearner(clip, config.prompt_length)
        dim = backbone.embed_dim(clip)
        self.text_linear = nn.Linear(dim, dim)  # FusionModule's, default init

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
        hooks = self.config.block_indices
        hooked: list[torch.Tensor] = []

        def record(index: int, x: torch.Tensor) -> torch.Tensor:
            if index in hooks:
                hooked.append(x[:, 1:])
            return x

        x = backbone.walk_vision(clip, backbone.vision_embed(clip, images), record)
        return hooked, backbone.vision_pool(clip, x)

    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens into the joint space, without `ln_post` (quirk) unless `patch_ln_post`.
        `[B, L, D_v]` -> `[B, L, D]`."""
        if self.config.patch_ln_post:
            return backbone.project_image_tokens(self.clipmodel, tokens)
        return backbone.project_tokens(self.clipmodel, tokens)

    def encode_image(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(global embedding `[B, D]`, raw patches, adapted stage features: `[B, g², D]` each)."""
        hooked, global_embedding = self.hooked_tokens(images)
        raw_patches, stage_features = [], []
        hooks = self.config.block_indices
        for adapter, index, tokens in zip(self.adapters, hooks, hooked, strict=True):
            weights = backbone.vision_attention_weights(self.clipmodel, index)
            raw_patches.append(self.project_patches(tokens))
            stage_features.append(self.project_patches(adapter(tokens, weights)))
        return global_embedding, raw_patches, stage_features

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None) -> SOWAOutput:
        """images `[B, 3, S, S]` -> text probabilities and per-stage pixel probabilities;
        `text` `[2, D]`: the prompt features (`encode_text()[0]`, computed when None)."""
        global_embedding, raw_patches, stage_features = self.encode_image(images)
        if text is None:
            text = self.encode_text()[0]  # [2, D]: every class uses the "object" row
        with float32_island(images.device):
            text = F.normalize(text.float(), dim=-1)
            image = F.normalize(global_embedding.float(), dim=-1)
            text_logits = image @ text.T / self.config.temperature  # [B, 2]
            anchors = text.T.expand(images.shape[0], -1, -1)  # [B, D, 2]
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
    # Few-shot memory (the original's k_shot mode)

    @torch.no_grad()
    def encode_memory(self, support_images: torch.Tensor) -> list[torch.Tensor]:
        """The support images' per-stage patch features (raw tokens @ proj by default), unit
        norm: support_images `[k, 3, S, S]` -> per stage `[k g², D]`."""
        if support_images.ndim != 4 or support_images.shape[0] < 1:
            shape = tuple(support_images.shape)
            raise DataError(f"support images have shape {shape}; expected [k, 3, S, S], k >= 1")
        _, raw_patches, stage_features = self.encode_image(support_images.to(self.device))
        features = raw_patches if self.config.memory_features == "raw" else stage_features
        return [F.normalize(f.float().flatten(0, 1), dim=-1) for f in features]

    def memory_map(self, features: list[torch.Tensor], memory: list[torch.Tensor]) -> torch.Tensor:
        """Sum over stages of each patch's cosine distance to its nearest memory patch,
        upsampled bilinearly (align_corners) to the input: `[B, S, S]`, each stage in [0, 2].
        features: per stage `[B, g², D]` (same kind as the memory); memory: per stage `[N, D]`
        (one class's), or `[B, N, D]` (each image's class's, as an export stacks them)."""
        total = 0.0
        for queries, bank in zip(features, memory, strict=True):
            queries = F.normalize(queries.float(), dim=-1)  # [B, L, D]
            distance = (1 - queries @ bank.transpose(-2, -1)).min(dim=-1).values  # [B, L]
            side = math.isqrt(distance.shape[1])
            grid = distance.view(-1, 1, side, side)
            total = (
                total
                + F.interpolate(grid, size=self.img_size, mode="bilinear", align_corners=True)[:, 0]
            )
        return total

    # ---------------------------------------------------------------------------------------
    # Inference

    @property
    def smoothing(self) -> str:
        config = self.config
        stages = f"{config.stage_reduce} of stage maps"
        if config.smoothing_sigma <= 0:
            return f"none on the {stages} (SOWA)"
        memory = "smoothed with it" if config.smooth_memory_map else "added unsmoothed"
        return (
            f"gaussian sigma {config.smoothing_sigma:g} px (scipy reflect) on the {stages}; "
            f"k-shot map {memory} (SOWA)"
        )

    def class_text(self, prompt_name: str) -> torch.Tensor:
        """The learned prompts' features `[2, D]` (the same for every class)."""
        with torch.no_grad():
            return self.encode_text()[0]

    def _predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        texts: torch.Tensor,
        valid_mask: torch.Tensor | None,
        memory: list[torch.Tensor] | None,
        domain: str,
    ) -> AnomalyOutput:
        """Anomaly map `[B, S, S]` and image score `[B]` (the original's test step).

        Map: Σ over stages of the anomaly probability (`stage_reduce`), Gaussian-smoothed, plus
        the unsmoothed k-shot map when a `memory` (`encode_memory`) is given. Score: the image
        softmax's anomaly probability. SOWA's prompts ignore the class names; `valid_mask`
        is not used.
        """
        config = self.config
        output = self(images, texts[0])  # [2, D]: the prompts are the same for every class
        with float32_island(images.device):
            anomaly = torch.stack([probs[:, 1] for probs in output.stage_probs])  # [N, B, S, S]
            anomaly_map = anomaly.sum(0) if config.stage_reduce == "sum" else anomaly.mean(0)
            if memory is not None:
                features = (
                    output.raw_patches if config.memory_features == "raw" else output.stage_features
                )
                memory_map = self.memory_map(features, memory)
                if config.smooth_memory_map:
                    anomaly_map = anomaly_map + memory_map
            if config.smoothing_sigma > 0:
                anomaly_map = gaussian_smooth(anomaly_map, config.smoothing_sigma, border="scipy")
            if memory is not None and not config.smooth_memory_map:
                anomaly_map = anomaly_map + memory_map  # unsmoothed, unweighted
        return AnomalyOutput(anomaly_map, output.text_probs[:, 1])

    @classmethod
    def table_image_scores(
        cls, extrema: MapExtrema, scores: np.ndarray, domain: str, few_shot: bool
    ) -> np.ndarray:
        """Zero-shot: the image softmax's anomaly probability. k-shot: `0.5 (score + minmax(map
        max))`, min-max over the class's test images (transductive)."""
        scores = np.asarray(scores, dtype=np.float64)
        if not few_shot:
            return scores
        return 0.5 * (scores + minmax_normalize(extrema.maxima.astype(np.float64)))

    # ---------------------------------------------------------------------------------------
    # Training (single stage)

    def stages(self) -> list[Stage]:
        return [
            Stage(
                "train",
                "sowa",
                self.config.epochs,
                self.config.batch_size,
                scheduler_interval="epoch",
            )
        ]

    def trainable_parameters(self, stage: Stage) -> list[dict[str, Any]]:
        """Adapters, prompt contexts and the text Linear, one group (no exemptions)."""
        self.requires_grad_(True)
        self.clipmodel.requires_grad_(False)
        return [
            {"params": [parameter for parameter in self.parameters() if parameter.requires_grad]}
        ]

    def configure_optimizer(
        self, stage: Stage
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """AdamW (betas 0.9/0.999, eps 1e-8) and ReduceLROnPlateau on the epoch loss."""
        config = self.config
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(stage),
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=5
        )
        return optimizer, scheduler

    def forward_train(self, batch: dict[str, Any], stage: Stage) -> SOWAOutput:
        return self(batch["image"])

    def loss(self, output: SOWAOutput, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Image CE (on probabilities by default: the original's double softmax) + the summed
        stages' focal + dice. Float32; terms `loss`, `ce`, `seg`."""
        mask, label = batch["mask"], batch["label"]
        with float32_island(mask.device):
            image_input = (
                output.text_probs if self.config.ce_on_probabilities else output.text_logits
            )
            ce_loss = F.cross_entropy(image_input.float(), label.long())
            target = (mask > 0).float()
            known = known_masks(batch)
            seg_loss = sum(
                pixel_loss(calculate_seg_loss, known, probs.float(), target)
                for probs in output.stage_probs
            )
            return {"loss": ce_loss + seg_loss, "ce": ce_loss, "seg": seg_loss}
