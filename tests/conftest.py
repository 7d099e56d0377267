"""Shared fixtures: a tiny random CLIP and a generated synthetic data set, built once per run."""

from __future__ import annotations

import pytest
import torch

from models.backbone import tiny_clip as build_tiny_clip


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2 cores; more intra-op threads only add contention."""
    torch.set_num_threads(2)


@pytest.fixture
def tiny_clip():
    """A fresh frozen tiny CLIP (ViT-L-14's depth, widths 64) per test: cheap (< 0.1 s)."""
    model = build_tiny_clip(img_size=64)
    model.requires_grad_(False)
    return model.eval()
