"""FE-CLIP: Frequency Enhanced CLIP for zero-shot anomaly detection and segmentation
(Gong et al., ICCV 2025). Spec: specs/feclip.md; the user's documents seeds/002, seeds/003.

No official code exists; the user's unofficial anomalib fork (taewanHwang/anomalib, commits
3a5b1c6c/264cb5bb) measured the seeds' numbers. At tap blocks of the frozen ViT the patch tokens go
through FFE (block DCT -> Linear + GELU -> inverse DCT) and LFS (sliding-window DCT statistics ->
Conv + GELU); `λ(ffe + lfs) + (1 - λ)·patch` replaces them in the residual stream. Each tap scores
the CLS token with CLIP's frozen projection and maps the fused patches through a learnable
`fc_patch`; scores and maps are averaged over taps. Tap indices are 0-based block indices.

Choices where the paper is silent, following the user's fork by default (spec §15), each with the
setting that changes it:
* `tap_indices=[15, 18, 21, 23]` (the fork's recommended "spread_3"); `[5, 11, 17, 23]` is the
  paper's most natural reading of "N = 4 blocks".
* `patch_ln_post=True`: the frozen `ln_post` runs before `fc_patch` (the fork); False skips it.
* `temperature=0.07` (the fork, AnomalyCLIP) rather than CLIP's learned logit scale.
* `fc_patch` trains at 1/100 of the adapters' lr (fork Exp12; train_feclip `--fc_patch_lr_ratio`,
  1 = the paper's "learnable fc", 0 = frozen, its "only FFE and LFS are optimised").
* `lfs_agg="mean"`: signed mean of the window's DCT coefficients (`abs`, `power` also measured).
Deliberate departure: seed 003's masked LFS multiplies frequency coefficients by the spatial
neighbour mask (two different index spaces); here the mask removes letterbox tokens from the
window before the transform (spec §5.1). The grid's own border padding is treated as plain LFS
treats it, so an all-valid mask gives exactly the unmasked statistic.
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
from torchvision.transforms.functional import gaussian_blur

from models import backbone
from models.aaclip import AnomalyOutput, clip_from_config
from utils.checkpoint import check_config, load_checkpoint
from utils.errors import CheckpointError, DataError

MODEL_NAME = "feclip"
DEFAULT_PROMPTS = ("A photo of a normal object", "A photo of a damaged object")
LFS_AGGREGATIONS = ("mean", "abs", "power")
PAD_MODES = {"replicate": "replicate", "zero": "constant"}
# Settings a checkpoint must share with the model it is loaded into.
CONFIG_KEYS = (
    "model",
    "model_name",
    "quick_gelu",
    "img_size",
    "tap_indices",
    "lambda_fuse",
    "ffe_window",
    "lfs_window",
    "lfs_agg",
    "lfs_pad",
    "ffe_pad",
    "temperature",
    "prompts",
    "patch_ln_post",
)


# --------------------------------------------------------------------------------------------
# DCT on token windows (spec §3)


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
    with torch.autocast(x.device.type, enabled=False):
        return torch.einsum("up,vq,...pqd->...uvd", basis, basis, x.float())


def idct2(y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2`: `Cᵀ Y C` over the window axes of `[..., n, n, D]`, float32."""
    with torch.autocast(y.device.type, enabled=False):
        return torch.einsum("up,vq,...uvd->...pqd", basis, basis, y.float())


def mean_coefficient_kernel(basis: torch.Tensor) -> torch.Tensor:
    """`K = w wᵀ / n²` with `w` the basis' column sums: the mean of a window's 2-D DCT
    coefficients is `Σ K ⊙ X` (spec §5). `[n, n]`."""
    column_sums = basis.sum(dim=0)
    return torch.outer(column_sums, column_sums) / basis.shape[0] ** 2


# --------------------------------------------------------------------------------------------
# Adapters


class FFEAdapter(nn.Module):
    """Frequency-aware feature extraction (spec §4): non-overlapping P x P windows -> 2-D DCT ->
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
    """Local frequency statistics (spec §5): Q x Q sliding windows (stride 1, centred) -> 2-D DCT
    -> mean (or mean |.|, mean square) of the Q² coefficients -> Conv2d(D, D, 3) + GELU.

    The signed mean is a fixed depthwise convolution (`mean_coefficient_kernel`); `abs`/`power`
    unfold the windows. With a token mask the statistic covers valid neighbours only (§5.1):
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

    def statistic(
        self, grid: torch.Tensor, token_mask: torch.Tensor | None = None, unfold: bool = False
    ) -> torch.Tensor:
        """The per-token window statistic before the Conv. grid `[B, H, W, D]`, token_mask
        `[B, H, W]` bool (True = real image) -> `[B, D, H, W]` float32. `unfold=True` takes the
        explicit DCT path for the mean too (a test reference)."""
        with torch.autocast(grid.device.type, enabled=False):
            x = grid.float().permute(0, 3, 1, 2)  # [B, D, H, W]
            scale = None
            if token_mask is not None:
                valid = token_mask.to(x.dtype)[:, None]  # [B, 1, H, W]
                x = x * valid
                # Outside-grid positions count as plain LFS counts them: replicated validity,
                # or valid zeros under zero padding; so an all-valid mask changes nothing.
                counts = F.avg_pool2d(
                    self._pad(valid, zero_value=1.0), self.window, stride=1, divisor_override=1
                )
                scale = self.window**2 / counts.clamp(min=1.0)  # [B, 1, H, W]
            padded = self._pad(x)
            if self.aggregation == "mean" and not unfold:
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


class TapFeatures(NamedTuple):
    """Per-tap tokens of `encode_image`, tap order."""

    cls_tokens: list[torch.Tensor]  # [B, D_v] as output by the tap block
    patch_tokens: list[torch.Tensor]  # [B, g², D_v] fused (what the next block receives)


class TapLogits(NamedTuple):
    """Per-tap margin logits `(cos(z, g_a) - cos(z, g_r)) / τ`; sigmoid = the 2-way softmax."""

    image_logits: torch.Tensor  # [N, B] float32
    patch_logits: torch.Tensor  # [N, B, g, g] float32


class FECLIP(nn.Module):
    """Frozen CLIP with FE-CLIP's FFE/LFS adapters at the tap blocks and a learnable `fc_patch`.

    Args:
        clip_model: a plain open_clip CLIP (frozen here).
        tap_indices: 0-based vision blocks followed by FFE + LFS (increasing).
        lambda_fuse: λ in `λ(ffe + lfs) + (1 - λ)·patch`.
        ffe_window: P, FFE window side.
        lfs_window: Q, LFS window side (odd).
        temperature: τ of the two-prompt softmax.
        prompts: (normal, abnormal) sentences, object-agnostic.
        patch_ln_post: frozen `ln_post` before `fc_patch` (the fork).
        smoothing_sigma: test-time Gaussian blur of the upsampled map in pixels (0: none).
        token_valid_frac: a token is valid when this fraction of its pixels is real image.
    """

    def __init__(
        self,
        clip_model: CLIP,
        tap_indices: list[int] | tuple[int, ...] = (15, 18, 21, 23),
        lambda_fuse: float = 0.1,
        ffe_window: int = 3,
        lfs_window: int = 3,
        lfs_agg: str = "mean",
        lfs_pad: str = "replicate",
        ffe_pad: str = "replicate",
        temperature: float = 0.07,
        prompts: list[str] | tuple[str, str] = DEFAULT_PROMPTS,
        patch_ln_post: bool = True,
        smoothing_sigma: float = 0.0,
        token_valid_frac: float = 0.5,
    ) -> None:
        super().__init__()
        blocks = backbone.num_vision_blocks(clip_model)
        taps = list(tap_indices)
        if not taps or sorted(set(taps)) != taps or taps[0] < 0 or taps[-1] >= blocks:
            raise ValueError(f"tap_indices {taps} must be increasing 0-based indices < {blocks}")
        if len(prompts) != 2 or temperature <= 0:
            raise ValueError("FE-CLIP needs two prompts (normal, abnormal) and temperature > 0")
        self.clipmodel = backbone.freeze(clip_model)
        self.tap_indices = taps
        self.lambda_fuse = lambda_fuse
        self.temperature = temperature
        self.prompts = list(prompts)
        self.patch_ln_post = patch_ln_post
        self.smoothing_sigma = smoothing_sigma
        self.token_valid_frac = token_valid_frac
        width = backbone.vision_width(clip_model)
        self.ffe = nn.ModuleList(FFEAdapter(width, ffe_window, ffe_pad) for _ in taps)
        self.lfs = nn.ModuleList(LFSAdapter(width, lfs_window, lfs_agg, lfs_pad) for _ in taps)
        self.fc_patch = nn.Linear(width, backbone.embed_dim(clip_model))
        self.register_buffer("text_features", self._encode_prompts(), persistent=False)

    def train(self, mode: bool = True) -> FECLIP:
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
        if self.smoothing_sigma > 0:
            return f"gaussian sigma {self.smoothing_sigma:g} px on the upsampled map (FE-CLIP)"
        return "none (FE-CLIP: bilinear upsampling of the tap-mean map)"

    @torch.no_grad()
    def _encode_prompts(self) -> torch.Tensor:
        """Unit text embeddings of the two prompts, frozen CLIP: `[2, D]` (normal, abnormal)."""
        token_ids = backbone.get_tokenizer()(self.prompts).to(self.device)
        with torch.autocast(self.device.type, enabled=False):
            return F.normalize(self.clipmodel.encode_text(token_ids).float(), dim=-1)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """FFE, LFS and `fc_patch` weights (no CLIP)."""
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

    def token_valid_mask(self, valid_mask: torch.Tensor) -> torch.Tensor:
        """Pixel validity `[B, S, S]` (True: real image, False: letterbox) -> token validity
        `[B, g, g]`: the valid fraction of each patch >= `token_valid_frac` (spec §14.1)."""
        grid = backbone.grid_size(self.clipmodel)
        fraction = F.adaptive_avg_pool2d(valid_mask[:, None].float(), grid)[:, 0]
        return fraction >= self.token_valid_frac

    def encode_image(
        self, images: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> TapFeatures:
        """Walk the ViT to the last tap, fusing FFE/LFS into the residual stream at each tap.

        images `[B, 3, S, S]`, token_mask `[B, g, g]` bool or None (all valid).
        """
        clip = self.clipmodel
        grid = backbone.grid_size(clip)
        first = self.tap_indices[0]
        cls_tokens: list[torch.Tensor] = []
        patch_tokens: list[torch.Tensor] = []

        def fuse(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if index not in self.tap_indices:
                return tokens
            tap = self.tap_indices.index(index)
            batch, length, width = tokens.shape
            patches = tokens[:, 1:].reshape(batch, grid, grid, width)  # [B, g, g, D_v]
            adapted = self.ffe[tap](patches) + self.lfs[tap](patches, token_mask)
            fused = self.lambda_fuse * adapted + (1 - self.lambda_fuse) * patches
            fused = fused.to(tokens.dtype).reshape(batch, length - 1, width)  # [B, g², D_v]
            cls_tokens.append(tokens[:, 0])
            patch_tokens.append(fused)
            return torch.cat([tokens[:, :1], fused], dim=1)

        # Adapters get no gradient through the blocks up to the first tap.
        with torch.no_grad():
            x = backbone.walk_vision(clip, backbone.vision_embed(clip, images), stop=first + 1)
        x = fuse(first, x)
        backbone.walk_vision(clip, x, fuse, start=first + 1, stop=self.tap_indices[-1] + 1)
        return TapFeatures(cls_tokens, patch_tokens)

    def margin_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """`[..., D]` -> `[...]`: `(cos(z, g_a) - cos(z, g_r)) / τ`, float32."""
        with torch.autocast(embeddings.device.type, enabled=False):
            cosines = F.normalize(embeddings.float(), dim=-1) @ self.text_features.T  # [..., 2]
            return (cosines[..., 1] - cosines[..., 0]) / self.temperature

    def forward(self, images: torch.Tensor, token_mask: torch.Tensor | None = None) -> TapLogits:
        """Per-tap image and patch logits (spec §8). images `[B, 3, S, S]`."""
        features = self.encode_image(images, token_mask)
        clip = self.clipmodel
        grid = backbone.grid_size(clip)
        image_logits = [
            self.margin_logits(backbone.project_image_tokens(clip, cls))
            for cls in features.cls_tokens
        ]  # each [B]
        patch_logits = []
        for tokens in features.patch_tokens:
            normed = backbone.post_norm(clip, tokens) if self.patch_ln_post else tokens
            logits = self.margin_logits(self.fc_patch(normed))  # [B, g²]
            patch_logits.append(logits.reshape(-1, grid, grid))
        return TapLogits(torch.stack(image_logits), torch.stack(patch_logits))

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        valid_mask: torch.Tensor | None = None,
    ) -> AnomalyOutput:
        """Anomaly map `[B, S, S]` and image score `[B]`, both means over taps of probabilities.

        images `[B, 3, S, S]`; `class_names` are unused (object-agnostic prompts) but must match
        the batch; valid_mask `[B, S, S]` bool (False on letterbox padding) or None (all valid):
        LFS averages over valid neighbours only and the map is 0 outside the image.
        """
        batch, _, height, width = images.shape
        if len(class_names) != batch:
            raise DataError(f"{len(class_names)} class names for {batch} images; pass one each")
        token_mask = None
        if valid_mask is not None:
            if valid_mask.shape != (batch, height, width):
                expected = (batch, height, width)
                msg = f"valid_mask has shape {tuple(valid_mask.shape)}; expected {expected}"
                raise DataError(msg)
            valid_mask = valid_mask.to(images.device).bool()
            token_mask = self.token_valid_mask(valid_mask)
        logits = self(images, token_mask)
        with torch.autocast(images.device.type, enabled=False):
            score = torch.sigmoid(logits.image_logits).mean(dim=0)  # [B]
            grid_map = torch.sigmoid(logits.patch_logits).mean(dim=0)  # [B, g, g]
            anomaly_map = F.interpolate(
                grid_map[:, None], size=(height, width), mode="bilinear", align_corners=False
            )  # [B, 1, S, S]
            if self.smoothing_sigma > 0:
                radius = int(4 * self.smoothing_sigma + 0.5)  # scipy's truncate=4
                size = 2 * radius + 1
                anomaly_map = gaussian_blur(
                    anomaly_map, [size, size], [self.smoothing_sigma, self.smoothing_sigma]
                )
            anomaly_map = anomaly_map[:, 0]
            if valid_mask is not None:
                anomaly_map = anomaly_map * valid_mask
        return AnomalyOutput(anomaly_map, score)

    @staticmethod
    def table_image_scores(maps: np.ndarray, scores: np.ndarray, domain: str) -> np.ndarray:
        """Paper-table image scores of one class: FE-CLIP reports the tap-mean CLS probability
        itself (spec §1.1, §12; no fusion with the maps). maps `[N, S, S]`, scores `[N]`."""
        return np.asarray(scores, dtype=np.float64)


def feclip_settings(config: dict) -> dict:
    """FECLIP's constructor arguments from a run config (CLI args or a checkpoint's config)."""
    return {
        "tap_indices": config["tap_indices"],
        "lambda_fuse": config["lambda_fuse"],
        "ffe_window": config["ffe_window"],
        "lfs_window": config["lfs_window"],
        "lfs_agg": config.get("lfs_agg", "mean"),
        "lfs_pad": config.get("lfs_pad", "replicate"),
        "ffe_pad": config.get("ffe_pad", "replicate"),
        "temperature": config["temperature"],
        "prompts": config.get("prompts", DEFAULT_PROMPTS),
        "patch_ln_post": config.get("patch_ln_post", True),
        "smoothing_sigma": config.get("smoothing_sigma", 0.0),
        "token_valid_frac": config.get("token_valid_frac", 0.5),
    }


def build_feclip(config: dict, device: torch.device | str = "cpu") -> FECLIP:
    """FECLIP from a run config (`model_name`, `pretrained`, `img_size`, `quick_gelu`, taps...)."""
    return FECLIP(clip_from_config(config, device), **feclip_settings(config)).to(device)


def load_feclip_state(model: FECLIP, path: Path, payload: dict, config: dict) -> None:
    """Check a checkpoint's config against `config` (naming the first differing setting), then
    load its trainable weights into `model`."""
    check_config(path, payload.get("config"), {"model": MODEL_NAME, **config}, CONFIG_KEYS)
    if MODEL_NAME not in payload:
        raise CheckpointError(f"{path} holds no FE-CLIP weights (keys: {sorted(payload)})")
    try:
        model.load_trainable_state_dict(payload[MODEL_NAME])
    except RuntimeError as error:
        msg = f"{path} has FE-CLIP weights of another shape; check --model_name and --tap_indices"
        raise CheckpointError(msg) from error


def from_checkpoint(
    path: Path, device: torch.device | str = "cpu", overrides: dict | None = None
) -> tuple[FECLIP, dict]:
    """FE-CLIP rebuilt from `feclip*.pth` and its stored config. `overrides` may change
    test-time settings (`smoothing_sigma`, `token_valid_frac`, `pretrained`); one that changes
    the architecture fails with the setting named. Returns (model in eval mode, payload)."""
    path = Path(path)
    payload = load_checkpoint(path)
    saved = payload.get("config")
    check_config(path, saved, {"model": MODEL_NAME}, ("model",))
    if not saved or "tap_indices" not in saved:
        model = (saved or {}).get("model", "unknown")
        raise CheckpointError(f"{path} is not an FE-CLIP checkpoint (model {model!r})")
    config = {**saved, **(overrides or {})}
    model = build_feclip(config, device)
    load_feclip_state(model, path, payload, config)
    return model.eval(), payload
