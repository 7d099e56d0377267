"""Shared maths: class text anchors, similarity maps, smoothing, token masks and losses (AA-CLIP's
`forward_utils.py`, FE-CLIP's Eq. 5 and token mask, SOWA's maps and losses).

Every model imports these; none copies them. Names and argument order are the original's, except
that the text anchors take prompt names where the original took a data set name: callers resolve
class names through the data catalogue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from models.prompts import build_prompts
from utils.core.errors import DataError
from utils.core.runtime import float32_island

# Test-time blur on the patch grid by domain, as AA-CLIP's calculate_similarity_map: size, sigma.
BLUR = {"Industrial": (7, 1.0), "Medical": (9, 1.5)}
SIMILARITY_SCALE = 100.0
FOCAL_SMOOTH = 1e-5


def get_adapted_single_class_text_embedding(
    model: torch.nn.Module,
    prompt_name: str,
    device: torch.device | str,
    image_context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text anchors of one class: `[D, 2]`, column 0 normal, column 1 abnormal, unit columns.

    Each state group's sentences about `prompt_name` (the class's real name, used as given) are
    encoded, L2-normalised, averaged and normalised again. `image_context` `[B_i, L, D]`
    conditions the text path of the cross-attention variant.
    """
    context = {} if image_context is None else {"image_context": image_context}
    anchors = []
    for sentences in build_prompts(prompt_name):
        token_ids = model.tokenize(sentences).to(device)  # [n, 77]
        features = F.normalize(model.encode_text(token_ids, **context), dim=-1)  # [n, D]
        anchors.append(F.normalize(features.mean(dim=0), dim=-1))  # [D]
    return torch.stack(anchors, dim=1)  # [D, 2]


def get_adapted_text_embedding(
    model: torch.nn.Module, prompt_names: Mapping[str, str], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """`{class_name: [D, 2]}` from `{class_name: prompt name}`, in the given order."""
    return {
        class_name: get_adapted_single_class_text_embedding(model, prompt_name, device)
        for class_name, prompt_name in prompt_names.items()
    }


def calculate_similarity_map(
    patch_features: torch.Tensor,
    epoch_text_feature: torch.Tensor,
    img_size: int,
    test: bool = False,
    domain: str = "Industrial",
    scale: float = SIMILARITY_SCALE,
) -> torch.Tensor:
    """Patch-vs-anchor similarity maps at image resolution.

    patch_features: `[B, L, D]` on a square grid (L = g²); epoch_text_feature: `[B, D, 2]` or
    `[D, 2]`. Train: softmax over (normal, abnormal) after bilinear upsampling -> `[B, 2, S, S]`.
    Test: `(abnormal + 1 - normal) / 2` blurred on the g x g grid (domain kernel, reflect border),
    then upsampled -> `[B, 1, S, S]`. Computed in float32 whatever the autocast dtype.
    `scale` multiplies the similarities (AA-CLIP 100; SOWA 1: softmax of raw cosines).
    """
    with float32_island(patch_features.device):
        return _similarity_map(patch_features, epoch_text_feature, img_size, test, domain, scale)


def _similarity_map(
    patch_features: torch.Tensor,
    epoch_text_feature: torch.Tensor,
    img_size: int,
    test: bool,
    domain: str,
    scale: float,
) -> torch.Tensor:
    scores = scale * torch.matmul(patch_features.float(), epoch_text_feature.float())
    batch, length, channels = scores.shape  # [B, L, 2]
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"patch features have {length} tokens, not a square grid")
    grid = scores.permute(0, 2, 1).reshape(batch, channels, side, side)  # [B, 2, g, g]
    if not test:
        upsampled = F.interpolate(grid, size=img_size, mode="bilinear", align_corners=True)
        return torch.softmax(upsampled, dim=1)  # [B, 2, S, S]
    anomaly = (grid[:, 1:2] + 1 - grid[:, 0:1]) / 2  # [B, 1, g, g]
    kernel, sigma = BLUR[domain]
    anomaly = gaussian_smooth(anomaly, sigma, size=kernel)
    return F.interpolate(anomaly, size=img_size, mode="bilinear", align_corners=True)


def gaussian_smooth(
    maps: torch.Tensor, sigma: float, size: int | None = None, border: str = "reflect"
) -> torch.Tensor:
    """Gaussian smoothing of maps `[..., H, W]` over the last two axes, every model's.

    `size` is the kernel side (default `2 * int(4 * sigma + 0.5) + 1`, scipy's `truncate=4`).
    `border="reflect"` is torchvision's `gaussian_blur` (mirror without the edge pixel: AA-CLIP on
    the patch grid with its domain kernel, FE-CLIP on the upsampled map); `"scipy"` is
    `scipy.ndimage.gaussian_filter`'s default mode (mirror with the edge: d c b a | a b c d) with
    the kernel computed in float64, as SOWA smooths its maps.
    """
    radius = int(4 * sigma + 0.5) if size is None else size // 2
    if border == "reflect":
        side = 2 * radius + 1 if size is None else size
        return gaussian_blur(maps, [side, side], [sigma, sigma])
    if border != "scipy":
        raise ValueError(f"unknown border {border!r}; use reflect or scipy")
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    for dim in (maps.ndim - 2, maps.ndim - 1):
        length = maps.shape[dim]
        index = torch.arange(-radius, length + radius, device=maps.device) % (2 * length)
        index = torch.where(index >= length, 2 * length - 1 - index, index)  # d c b a | a b c d
        padded = maps.index_select(dim, index).movedim(dim, -1)  # [..., length + 2r]
        shape = padded.shape
        smoothed = F.conv1d(padded.reshape(-1, 1, shape[-1]), kernel.view(1, 1, -1))
        maps = smoothed.view(*shape[:-1], length).movedim(-1, dim)
    return maps


def token_valid_mask(
    valid_mask: torch.Tensor, grid: int, min_fraction: float = 0.5
) -> torch.Tensor:
    """Pixel validity `[..., S, S]` bool -> token validity `[..., g, g]` bool: a token is valid
    when the valid fraction of its pixels is >= `min_fraction` (FE-CLIP's `token_valid_frac`;
    1.0 = all of its pixels valid). Exact when g divides S (one token = one patch, as for
    ViT-L-14-336 and the tiny backbone); otherwise adaptive average-pool cells.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise DataError(f"min_fraction {min_fraction} is outside (0, 1]; use e.g. 0.5")
    shape = valid_mask.shape
    flat = valid_mask.reshape(-1, 1, *shape[-2:]).float()
    fraction = F.adaptive_avg_pool2d(flat, grid)  # [N, 1, g, g]
    # Fractions are k / patch²; a tolerance keeps k / patch² == min_fraction on the valid side.
    return (fraction >= min_fraction - 1e-6).reshape(*shape[:-2], grid, grid)


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss on softmax maps (alpha 1, one-hot clamped to [1e-5, 1-1e-5], as the original).

    probs: `[B, 2, S, S]`; target: `[B, 1, S, S]` in {0, 1}. Mean over all pixels.
    """
    true_prob = torch.where(target.bool(), probs[:, 1:2], probs[:, 0:1])  # [B, 1, S, S]
    pt = true_prob * (1 - 2 * FOCAL_SMOOTH) + 2 * FOCAL_SMOOTH
    return (-((1 - pt) ** gamma) * torch.log(pt)).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """`1 - mean_b (2 Σ p·y + s) / (Σ p + Σ y + s)`, sums per sample, s = `smooth` (AA-CLIP and
    AnomalyCLIP 1). Shapes `[B, ...]`."""
    probs = probs.flatten(1)
    target = target.flatten(1)
    dice = (2 * (probs * target).sum(1) + smooth) / (probs.sum(1) + target.sum(1) + smooth)
    return 1 - dice.mean()


def known_masks(batch: dict[str, Any]) -> torch.Tensor:
    """`[B]` bool: the images whose mask is known (`mask_known`; an anomalous image without a
    mask has none). Every image when the batch does not say."""
    mask = batch["mask"]
    known = batch.get("mask_known")
    if known is None:
        return torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    return known.to(device=mask.device, dtype=torch.bool)


def pixel_loss(
    loss: Callable[..., torch.Tensor], known: torch.Tensor, *tensors: torch.Tensor
) -> torch.Tensor:
    """`loss(*tensors)` on the rows `known` `[B]` only (pixel losses skip images whose mask is
    unknown, per sample); a zero that keeps the graph when no row is known."""
    if not bool(known.any()):
        return tensors[0].sum() * 0
    if bool(known.all()):
        return loss(*tensors)
    return loss(*(tensor[known] for tensor in tensors))


def calculate_seg_loss(patch_preds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Focal + dice(normal, 1-mask) + dice(abnormal, mask). `[B, 2, S, S]`, `[B, 1, S, S]`."""
    return (
        focal_loss(patch_preds, mask)
        + dice_loss(patch_preds[:, 0], 1 - mask[:, 0])
        + dice_loss(patch_preds[:, 1], mask[:, 0])
    )


def orthogonal_loss(epoch_text_feature: torch.Tensor) -> torch.Tensor:
    """Squared batch-mean cosine between normal and abnormal anchors. `[B, D, 2]` -> scalar."""
    return ((epoch_text_feature[:, :, 0] * epoch_text_feature[:, :, 1]).sum(1).mean()) ** 2


def binary_focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Focal loss on a one-channel anomaly probability map (FE-CLIP, the paper's Eq. 5):
    mean of `-α_t (1 - p_t)^γ log p_t`, p clamped to [1e-6, 1 - 1e-6]. `alpha` None weighs both
    classes 1 (AnomalyCLIP); a float weighs positives by α and negatives by 1 - α.

    probs, target: `[B, 1, S, S]` (target in {0, 1}).
    """
    probs = probs.clamp(1e-6, 1 - 1e-6)
    positive = target.bool()
    pt = torch.where(positive, probs, 1 - probs)
    loss = -((1 - pt) ** gamma) * torch.log(pt)
    if alpha is not None:
        loss = loss * torch.where(positive, alpha, 1 - alpha)
    return loss.mean()


def minmax_normalize(x: Any) -> np.ndarray:
    """`(x - min) / (max - min)` over the whole array, left unchanged when the maximum is exactly
    1 or the array is constant (AA-CLIP's rule, which SOWA's k-shot fusion shares)."""
    x = np.asarray(x)
    low, high = x.min(), x.max()
    if high == 1 or high == low:
        return x
    return (x - low) / (high - low)
