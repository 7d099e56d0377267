"""AA-CLIP's adapter modules; state-dict keys equal the original's so its checkpoints load."""

from __future__ import annotations

import torch
from torch import nn


class SimpleAdapter(nn.Module):
    """Bias-free linear map + LeakyReLU(0.01). Key: `fc.0.weight` `[c_out, c_in]`."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class SimpleProj(nn.Module):
    """Bias-free projection, LeakyReLU only when `relu`.

    The key depends on `relu` (`fc.0.weight` with it, `fc.weight` without), exactly as in the
    original, so checkpoints are not interchangeable across the flag (the original's `--relu`
    is off by default, its `AdaptedCLIP` class default on).
    """

    def __init__(self, c_in: int, c_out: int, relu: bool = True) -> None:
        super().__init__()
        if relu:
            self.fc = nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.LeakyReLU())
        else:
            self.fc = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def residual_blend(x: torch.Tensor, adapted: torch.Tensor, weight: float) -> torch.Tensor:
    """Norm-preserving weighted residual: rescale `adapted` to `x`'s per-token norm, then blend.

    `x = weight * adapted * |x| / |adapted| + (1 - weight) * x`, norms over the last dim, no
    epsilon (as the original). With weight 0 this is exactly `x`. Shapes `[..., C]`.
    """
    adapted = adapted * x.norm(dim=-1, keepdim=True) / adapted.norm(dim=-1, keepdim=True)
    return weight * adapted + (1 - weight) * x


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform every weight (`dim > 1`), as the original initialises its adapters."""
    for parameter in module.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)
