"""FE-CLIP: Frequency Enhanced CLIP for zero-shot anomaly detection and segmentation
(Gong et al., ICCV 2025). The user's documents: seeds/002, seeds/003.

No official code exists; the user's unofficial anomalib fork (taewanHwang/anomalib, commits
3a5b1c6c/264cb5bb) measured the seeds' numbers. At tap blocks of the frozen ViT the patch tokens go
through FFE (block DCT -> Linear + GELU -> inverse DCT) and LFS (sliding-window DCT statistics ->
Conv + GELU); `λ(ffe + lfs) + (1 - λ)·patch` replaces them in the residual stream. Each tap scores
the CLS token with CLIP's frozen projection and maps the fused patches through a learnable
`fc_patch`; scores and maps are averaged over taps. The taps are `block_indices`, 0-based
(the fork's name `tap_indices` is an alias).

Training is one stage (the paper's Eq. 4/5): BCE on each tap's image logit plus focal
and dice on each tap's anomaly probability map upsampled to the input, averaged over taps; Adam,
no scheduler. Checkpoints `feclip.pth` / `feclip_<epoch>.pth` hold the trainable weights.
Image labels alone: the BCE terms train on every image; focal and dice skip, per sample, the
anomalous images without a mask (`--pixel_loss off` skips every mask).

Choices where the paper is silent, following the user's fork by default, each with the setting
that changes it:
* `block_indices=[15, 18, 21, 23]` (the fork's recommended "spread_3"); `[5, 11, 17, 23]` is the
  paper's most natural reading of "N = 4 blocks".
* `patch_ln_post=True`: the frozen `ln_post` runs before `fc_patch` (the fork); False skips it.
* `temperature=0.07` (the fork, AnomalyCLIP) rather than CLIP's learned logit scale.
* `fc_patch` trains at 1/100 of the adapters' lr (fork Exp12; `fc_patch_lr_ratio` 1 = the
  paper's "learnable fc", 0 = frozen, its "only FFE and LFS are optimised").
* `lfs_agg="mean"`: signed mean of the window's DCT coefficients (`abs`, `power` also measured).
Deliberate departure: seed 003's masked LFS multiplies frequency coefficients by the spatial
neighbour mask (two different index spaces); here the mask removes letterbox tokens from the
window before the transform. The grid's own border padding is treated as plain LFS
treats it, so an all-valid mask gives exactly the unmasked statistic.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from models import backbone
from models.base import (
    AnomalyOutput,
    ClipConfig,
    FrozenCLIPModel,
    SingleStageConfig,
    Stage,
)
from models.forward_utils import (
    binary_focal_loss,
    dice_loss,
    gaussian_smooth,
    known_masks,
    pixel_loss,
    token_valid_mask,
)
from utils.core.config import ARCH, TEST, redefault, setting
from utils.core.errors import ConfigError
from utils.core.runtime import float32_island

DEFAULT_PROMPTS = ["A photo of a normal object", "A photo of a damaged object"]
LFS_AGGREGATIONS = ("mean", "abs", "power")
PAD_MODES = {"replicate": "replicate", "zero": "constant"}


# --------------------------------------------------------------------------------------------
# DCT on token windows (orthonormal DCT-II)


def dct_basis(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Orthonormal DCT-II matrix `[n, n]` (rows frequencies k, columns positions i), float32:
    `C[k, i] = a_k cos(π (2i + 1) k / 2n)`, `a_0 = sqrt(1/n)`, `a_k = sqrt(2/n)`."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    basis[0] = math.sqrt(1 / n)
    return basis.to(device=device, dtype=torch.float32)


def dct2(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """2-D DCT `C X Cᵀ` over the window axes of `[..., n, n, D]` (channels last), float32."""
    with float32_island(x.device):
        return torch.einsum("up,vq,...pqd->...uvd", basis, basis, x.float())


def idct2(y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2`: `Cᵀ Y C` over the window axes of `[..., n, n, D]`, float32."""
    with float32_island(y.device):
        return torch.einsum("up,vq,...uvd->...pqd", basis, basis, y.float())


def mean_coefficient_kernel(basis: torch.Tensor) -> torch.Tensor:
    """`K = w wᵀ / n²` with `w` the basis' column sums: the mean of a window's 2-D DCT
    coefficients is `Σ K ⊙ X`. `[n, n]`."""
    column_sums = basis.sum(dim=0)
    return torch.outer(column_sums, column_sums) / basis.shape[0] ** 2


# --------------------------------------------------------------------------------------------
# Adapters


class FFEAdapter(nn.Module):
    """Frequency-aware feature extraction: non-overlapping P x P windows -> 2-D DCT ->
    Linear(D, D) + GELU over channels -> inverse DCT. A grid that P does not divide is padded at
    the bottom/right (`pad`: replicate or zero) and cropped back."""

    def __init__(self, width: int, window: int = 3, pad: str = "replicate") -> None:
        super().__init__()
        if window < 1 or pad not in PAD_MODES:
            raise ValueError(f"FFE window {window} must be >= 1 and pad one of {list(PAD_MODES)}")
        self.window = window
        self.pad = pad
        self.fc = nn.Linear(width, width)
        self.register_buffer("basis", dct_basis(window), persistent=False)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """`[B, H, W, D]` -> `[B, H, W, D]` (float32)."""
        batch, height, width, channels = grid.shape
        p = self.window
        pad_h, pad_w = -height % p, -width % p
        if pad_h or pad_w:
            grid = grid.permute(0, 3, 1, 2)  # [B, D, H, W]
            grid = F.pad(grid, (0, pad_w, 0, pad_h), mode=PAD_MODES[self.pad])
            grid = grid.permute(0, 2, 3, 1)  # [B, H', W', D]
        rows, cols = grid.shape[1] // p, grid.shape[2] // p
        windows = grid.reshape(batch, rows, p, cols, p, channels).transpose(2, 3)  # [B,r,c,P,P,D]
        coefficients = F.gelu(self.fc(dct2(windows, self.basis)))
        windows = idct2(coefficients, self.basis)  # [B, r, c, P, P, D]
        grid = windows.transpose(2, 3).reshape(batch, rows * p, cols * p, channels)
        return grid[:, :height, :width]


class LFSAdapter(nn.Module):
    """Local frequency statistics: Q x Q sliding windows (stride 1, centred) -> 2-D DCT
    -> mean (or mean |.|, mean square) of the Q² coefficients -> Conv2d(D, D, 3) + GELU.

    The signed mean is a fixed depthwise convolution (`mean_coefficient_kernel`); `abs`/`power`
    unfold the windows. With a token mask the statistic covers valid neighbours only:
    invalid tokens are zeroed and the window rescaled by Q² / (number of valid neighbours).
    """

    def __init__(
        self, width: int, window: int = 3, aggregation: str = "mean", pad: str = "replicate"
    ) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"LFS window {window} must be odd (centred on each token)")
        if aggregation not in LFS_AGGREGATIONS or pad not in PAD_MODES:
            msg = f"LFS aggregation must be one of {LFS_AGGREGATIONS}, pad one of {list(PAD_MODES)}"
            raise ValueError(msg)
        self.window = window
        self.aggregation = aggregation
        self.pad = pad
        self.conv = nn.Conv2d(width, width, kernel_size=3, padding=1)
        basis = dct_basis(window)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("kernel", mean_coefficient_kernel(basis), persistent=False)

    def _pad(self, x: torch.Tensor, zero_value: float = 0.0) -> torch.Tensor:
        """Pad `[B, C, H, W]` by Q//2 on each side with this adapter's border rule."""
        r = self.window // 2
        if self.pad == "replicate":
            return F.pad(x, (r, r, r, r), mode="replicate")
        return F.pad(x, (r, r, r, r), value=zero_value)

    def statistic(self, grid: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The per-token window statistic before the Conv. grid `[B, H, W, D]`, token_mask
        `[B, H, W]` bool (True = real image) -> `[B, D, H, W]` float32."""
        with float32_island(grid.device):
            x = grid.float().permute(0, 3, 1, 2)  # [B, D, H, W]
            scale = None
            if token_mask is not None:
                valid = token_mask.to(x.dtype)[:, None]  # [B, 1, H, W]
                x = x * valid
                # Outside-grid positions count as plain LFS counts them: replicated validity,
                # or valid zeros under zero padding; so an all-valid mask changes nothing.
                # A sum of ones by a convolution: exact integers, as avg_pool2d's
                # divisor_override=1, which the ONNX export would drop.
                ones = valid.new_ones(1, 1, self.window, self.window)
                counts = F.conv2d(self._pad(valid, zero_value=1.0), ones)
                scale = self.window**2 / counts.clamp(min=1.0)  # [B, 1, H, W]
            padded = self._pad(x)
            if self.aggregation == "mean":
                channels = x.shape[1]
                weight = self.kernel.expand(channels, 1, self.window, self.window)
                stat = F.conv2d(padded, weight, groups=channels)
                return stat if scale is None else stat * scale
            return self._unfolded_statistic(padded, x.shape, scale)

    def _unfolded_statistic(
        self, padded: torch.Tensor, shape: torch.Size, scale: torch.Tensor | None
    ) -> torch.Tensor:
        batch, channels, height, width = shape
        q = self.window
        windows = F.unfold(padded, q).view(batch, channels, q, q, height, width)
        windows = windows.permute(0, 4, 5, 2, 3, 1)  # [B, H, W, Q, Q, D]
        if scale is not None:
            windows = windows * scale[:, 0, :, :, None, None, None]
        coefficients = dct2(windows, self.basis)
        if self.aggregation == "abs":
            coefficients = coefficients.abs()
        elif self.aggregation == "power":
            coefficients = coefficients.square()
        return coefficients.mean(dim=(3, 4)).permute(0, 3, 1, 2)  # [B, D, H, W]

    def forward(self, grid: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, H, W, D]`, optional token mask `[B, H, W]` -> `[B, H, W, D]`."""
        stat = self.statistic(grid, token_mask)
        return F.gelu(self.conv(stat)).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------
# Model


@dataclasses.dataclass
class FEClipConfig(SingleStageConfig):
    """FE-CLIP's settings (the paper's; the user's fork's where the paper is silent)."""

    name: ClassVar[str] = "feclip"
    paper_img_size: ClassVar[int] = 336
    run_defaults: ClassVar[dict[str, Any]] = {
        "save_path": Path("ckpt/feclip"),
        "seed": 42,  # the fork's first of 5 seeds (42, 123, 456, 789, 1024)
        "augment": False,  # the paper states no augmentation
        # The paper/original trains on the whole test split of the auxiliary data set.
        "training_mode": "full_shot",
    }

    quick_gelu: bool = redefault(ClipConfig, "quick_gelu", True)  # as OpenAI trained it
    # The fork's pipeline: torchvision Resize(S) + CenterCrop(S) on float tensors (quirk: PIL's
    # 8-bit resize, the project's before, is --resize_backend pil).
    preprocess: str = redefault(ClipConfig, "preprocess", "short_side_crop")
    resize_backend: str = redefault(ClipConfig, "resize_backend", "torch")
    block_indices: list[int] = redefault(
        ClipConfig,
        "block_indices",
        [15, 18, 21, 23],
        help="0-based vision blocks followed by FFE + LFS (the fork's spread_3; the paper's "
        "likely reading: 5 11 17 23)",
        aliases={"tap_indices": 0},
        original="tap_indices",
    )
    lambda_fuse: float = setting(0.1, "λ of the fusion λ(ffe + lfs) + (1 - λ)·patch", kind=ARCH)
    ffe_window: int = setting(3, "P, the FFE window side", kind=ARCH, minimum=1)
    lfs_window: int = setting(3, "Q, the LFS window side (odd)", kind=ARCH, minimum=1)
    lfs_agg: str = setting(
        "mean",
        "LFS statistic of a window's DCT coefficients: signed mean, mean |.|, mean square",
        kind=ARCH,
        choices=LFS_AGGREGATIONS,
    )
    lfs_pad: str = setting("replicate", "LFS window border", kind=ARCH, choices=tuple(PAD_MODES))
    ffe_pad: str = setting(
        "replicate", "FFE pad when P does not divide the grid", kind=ARCH, choices=tuple(PAD_MODES)
    )
    temperature: float = setting(
        0.07,
        "τ of the two-prompt softmax (the fork, AnomalyCLIP)",
        kind=ARCH,
        above=0,
        aliases={"tau": 0},
    )
    prompts: list[str] = setting(
        DEFAULT_PROMPTS,
        "the (normal, abnormal) object-agnostic prompts",
        kind=ARCH,
        nargs=2,
        metavar=("NORMAL", "ABNORMAL"),
    )
    patch_ln_post: bool = setting(True, "frozen ln_post before fc_patch (the fork)", kind=ARCH)
    smoothing_sigma: float = setting(
        0.0,
        "test-time Gaussian blur of the upsampled map in pixels (0: none; the seed measured 2)",
        kind=TEST,
        minimum=0,
    )
    token_valid_frac: float = setting(
        0.5,
        "letterboxed inputs: a token is valid when at least this fraction of it is real image",
        kind=TEST,
        above=0,
    )
    epochs: int = redefault(SingleStageConfig, "epochs", 9)
    batch_size: int = redefault(SingleStageConfig, "batch_size", 16)
    keep_epoch: str = redefault(SingleStageConfig, "keep_epoch", "lowest_loss")  # the fork's
    lr: float = setting(5e-4, "Adam learning rate of FFE and LFS", above=0)
    fc_patch_lr_ratio: float = setting(
        0.01, "fc_patch lr = lr x this (the fork: 1/100; 1: the same lr; 0: frozen)", minimum=0
    )
    w_cls: float = setting(1.0, "weight of L_cls")
    w_mask: float = setting(1.0, "weight of L_mask")
    focal_gamma: float = setting(2.0, "focal loss γ", minimum=0)
    focal_alpha: float | None = setting(
        0.25, "positive-class focal weight (the fork's 0.25; unset: none, AnomalyCLIP's)"
    )
    dice_smooth: float = setting(1e-6, "dice smoothing (the fork's 1e-6; AnomalyCLIP 1)", minimum=0)

    def check(self) -> None:
        if self.lfs_window % 2 == 0:
            raise ConfigError(f"--lfs_window {self.lfs_window} must be odd (centred on a token)")
        if len(self.prompts) != 2:
            raise ConfigError("--prompts takes two sentences: normal, abnormal")


class TapFeatures(NamedTuple):
    """Per-tap tokens of `encode_image`, tap order."""

    cls_tokens: list[torch.Tensor]  # [B, D_v] as output by the tap block
    patch_tokens: list[torch.Tensor]  # [B, g², D_v] fused (what the next block receives)


class TapLogits(NamedTuple):
    """Per-tap margin logits `(cos(z, g_a) - cos(z, g_r)) / τ`; sigmoid = the 2-way softmax."""

    image_logits: torch.Tensor  # [N, B] float32
    patch_logits: torch.Tensor  # [N, B, g, g] float32


# The user's anomalib fork saves `best_model.pt` = {epoch, model_state_dict, tap_indices, loss},
# keys under `model.`; its FFE Linear and LFS Conv sit in Sequentials with their GELU, and the
# frozen CLIP (`model.clip.*`) is saved too (not read: ours is loaded from its weights).
ORIGINAL_KEYS = (
    (re.compile(r"^model\.ffe\.(\d+)\.mlp\.0\."), r"ffe.\1.fc."),
    (re.compile(r"^model\.lfs\.(\d+)\.conv\.0\."), r"lfs.\1.conv."),
    (re.compile(r"^model\.fc_patch\."), "fc_patch."),
)


class FEClip(FrozenCLIPModel):
    """Frozen CLIP with FE-CLIP's FFE/LFS adapters at the tap blocks and a learnable `fc_patch`
    (settings: `FEClipConfig`)."""

    config_class = FEClipConfig
    checkpoint_file = "feclip.pth"
    log_file = "train_feclip.log"

    @classmethod
    def is_original(cls, payload: dict[str, Any]) -> bool:
        """The fork's `best_model.pt`: its weights under `model_state_dict`."""
        return "model_state_dict" in payload

    @classmethod
    def original_settings(
        cls, path: Path, payload: dict[str, Any], trust: bool = False
    ) -> dict[str, Any]:
        """The fork's file names its taps."""
        return {"block_indices": list(payload["tap_indices"])} if "tap_indices" in payload else {}

    def from_original(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The fork's `best_model.pt` in our layout."""
        return self.nested_original(payload, "model_state_dict", ORIGINAL_KEYS)

    def __init__(self, config: FEClipConfig | None = None, clip: CLIP | None = None) -> None:
        config = config if config is not None else FEClipConfig()
        super().__init__(config, clip)
        width = backbone.vision_width(self.clipmodel)
        taps = config.block_indices
        self.ffe = nn.ModuleList(FFEAdapter(width, config.ffe_window, config.ffe_pad) for _ in taps)
        self.lfs = nn.ModuleList(
            LFSAdapter(width, config.lfs_window, config.lfs_agg, config.lfs_pad) for _ in taps
        )
        self.fc_patch = nn.Linear(width, backbone.embed_dim(self.clipmodel))
        self.register_buffer("text_features", self._encode_prompts(), persistent=False)

    @torch.no_grad()
    def _encode_prompts(self) -> torch.Tensor:
        """Unit text embeddings of the two prompts, frozen CLIP: `[2, D]` (normal, abnormal)."""
        token_ids = backbone.get_tokenizer()(self.config.prompts).to(self.device)
        with float32_island(self.device):
            return F.normalize(self.clipmodel.encode_text(token_ids).float(), dim=-1)

    # ---------------------------------------------------------------------------------------

    def encode_image(
        self, images: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> TapFeatures:
        """Walk the ViT to the last tap, fusing FFE/LFS into the residual stream at each tap.

        images `[B, 3, S, S]`, token_mask `[B, g, g]` bool or None (all valid).
        """
        clip = self.clipmodel
        grid = backbone.grid_size(clip)
        taps = self.config.block_indices
        lambda_fuse = self.config.lambda_fuse
        cls_tokens: list[torch.Tensor] = []
        patch_tokens: list[torch.Tensor] = []

        def fuse(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if index not in taps:
                return tokens
            tap = taps.index(index)
            batch, length, width = tokens.shape
            patches = tokens[:, 1:].reshape(batch, grid, grid, width)  # [B, g, g, D_v]
            adapted = self.ffe[tap](patches) + self.lfs[tap](patches, token_mask)
            fused = lambda_fuse * adapted + (1 - lambda_fuse) * patches
            fused = fused.to(tokens.dtype).reshape(batch, length - 1, width)  # [B, g², D_v]
            cls_tokens.append(tokens[:, 0])
            patch_tokens.append(fused)
            return torch.cat([tokens[:, :1], fused], dim=1)

        # Adapters get no gradient through the blocks up to the first tap.
        with torch.no_grad():
            x = backbone.walk_vision(clip, backbone.vision_embed(clip, images), stop=taps[0] + 1)
        x = fuse(taps[0], x)
        backbone.walk_vision(clip, x, fuse, start=taps[0] + 1, stop=taps[-1] + 1)
        return TapFeatures(cls_tokens, patch_tokens)

    def margin_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """`[..., D]` -> `[...]`: `(cos(z, g_a) - cos(z, g_r)) / τ`, float32."""
        with float32_island(embeddings.device):
            cosines = F.normalize(embeddings.float(), dim=-1) @ self.text_features.T  # [..., 2]
            return (cosines[..., 1] - cosines[..., 0]) / self.config.temperature

    def forward(self, images: torch.Tensor, token_mask: torch.Tensor | None = None) -> TapLogits:
        """Per-tap image and patch logits. images `[B, 3, S, S]`."""
        features = self.encode_image(images, token_mask)
        clip = self.clipmodel
        grid = backbone.grid_size(clip)
        image_logits = [
            self.margin_logits(backbone.project_image_tokens(clip, cls))
            for cls in features.cls_tokens
        ]  # each [B]
        patch_logits = []
        for tokens in features.patch_tokens:
            normed = backbone.post_norm(clip, tokens) if self.config.patch_ln_post else tokens
            logits = self.margin_logits(self.fc_patch(normed))  # [B, g²]
            patch_logits.append(logits.reshape(-1, grid, grid))
        return TapLogits(torch.stack(image_logits), torch.stack(patch_logits))

    # ---------------------------------------------------------------------------------------
    # Inference

    @property
    def smoothing(self) -> str:
        sigma = self.config.smoothing_sigma
        if sigma > 0:
            return f"gaussian sigma {sigma:g} px on the upsampled map (FE-CLIP)"
        return "none (FE-CLIP: bilinear upsampling of the tap-mean map)"

    def class_text(self, prompt_name: str) -> torch.Tensor:
        """The object-agnostic prompt embeddings `[2, D]` (the same for every class)."""
        return self.text_features

    def _predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        texts: Any,
        valid_mask: torch.Tensor | None,
        memory: Any,
        domain: str,
    ) -> AnomalyOutput:
        """Anomaly map `[B, S, S]` and image score `[B]`, both means over taps of probabilities.

        The prompts are object-agnostic (the class names only count the images); with a
        valid_mask `[B, S, S]` (False on letterbox padding) LFS averages over valid neighbours
        only and the map is 0 outside the image.
        """
        height, width = images.shape[-2:]
        token_mask = None
        if valid_mask is not None:
            grid = backbone.grid_size(self.clipmodel)
            token_mask = token_valid_mask(valid_mask, grid, self.config.token_valid_frac)
        logits = self(images, token_mask)
        with float32_island(images.device):
            score = torch.sigmoid(logits.image_logits).mean(dim=0)  # [B]
            grid_map = torch.sigmoid(logits.patch_logits).mean(dim=0)  # [B, g, g]
            anomaly_map = F.interpolate(
                grid_map[:, None], size=(height, width), mode="bilinear", align_corners=False
            )  # [B, 1, S, S]
            if self.config.smoothing_sigma > 0:
                anomaly_map = gaussian_smooth(anomaly_map, self.config.smoothing_sigma)
            anomaly_map = anomaly_map[:, 0]
            if valid_mask is not None:
                anomaly_map = anomaly_map * valid_mask
        return AnomalyOutput(anomaly_map, score)

    # The table's image score is the tap-mean CLS probability itself (the paper's S_a, the mean
    # over taps of S_a,n): the base class's `table_image_scores`.

    # ---------------------------------------------------------------------------------------
    # Training (single stage, the paper's Eq. 4/5)

    def stages(self) -> list[Stage]:
        config = self.config
        return [Stage("train", "feclip", config.epochs, config.batch_size, keep=config.keep_epoch)]

    def trainable_parameters(self, stage: Stage) -> list[dict[str, Any]]:
        """FFE + LFS at `lr`, `fc_patch` at `lr x fc_patch_lr_ratio` (0: frozen)."""
        config = self.config
        self.requires_grad_(False)
        adapters = [*self.ffe.parameters(), *self.lfs.parameters()]
        for parameter in adapters:
            parameter.requires_grad_(True)
        groups = [{"params": adapters, "lr": config.lr}]
        if config.fc_patch_lr_ratio > 0:
            self.fc_patch.requires_grad_(True)
            groups.append(
                {
                    "params": list(self.fc_patch.parameters()),
                    "lr": config.lr * config.fc_patch_lr_ratio,
                }
            )
        return groups

    def configure_optimizer(
        self, stage: Stage
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """Adam, no scheduler."""
        return torch.optim.Adam(self.trainable_parameters(stage)), None

    def forward_train(self, batch: dict[str, Any], stage: Stage) -> TapLogits:
        return self(batch["image"])

    def loss(self, output: TapLogits, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`w_cls · L_cls + w_mask · L_mask`, each averaged over taps (the paper's Eq. 4/5): BCE
        on each tap's image logit; focal + dice on each tap's anomaly probability map upsampled
        bilinearly to the input. Float32; terms `loss`, `cls`, `mask`."""
        config = self.config
        mask, label = batch["mask"], batch["label"]
        with float32_island(mask.device):
            image_logits = output.image_logits.float()
            taps = image_logits.shape[0]
            targets = label.float().expand(taps, -1)  # [N, B]
            cls_loss = F.binary_cross_entropy_with_logits(image_logits, targets)
            ground_truth = (mask > 0.5).float()  # [B, 1, S, S]
            probs = torch.sigmoid(output.patch_logits.float())  # [N, B, g, g]
            known = known_masks(batch)

            def tap_loss(upsampled: torch.Tensor, ground_truth: torch.Tensor) -> torch.Tensor:
                focal = binary_focal_loss(
                    upsampled, ground_truth, config.focal_gamma, config.focal_alpha
                )
                return focal + dice_loss(upsampled, ground_truth, config.dice_smooth)

            mask_loss = mask.new_zeros(())
            for tap_probs in probs:
                upsampled = F.interpolate(
                    tap_probs[:, None], size=mask.shape[-2:], mode="bilinear", align_corners=False
                )  # [B, 1, S, S]
                mask_loss = mask_loss + pixel_loss(tap_loss, known, upsampled, ground_truth)
            mask_loss = mask_loss / taps
            total = config.w_cls * cls_loss + config.w_mask * mask_loss
            return {"loss": total, "cls": cls_loss, "mask": mask_loss}
