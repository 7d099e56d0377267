"""Losses and similarity maps against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.testing import assert_close

from models.forward_utils import (
    calculate_seg_loss,
    calculate_similarity_map,
    dice_loss,
    focal_loss,
    minmax_normalize,
    orthogonal_loss,
)


def focal_term(p_true: float) -> float:
    pt = p_true * (1 - 2e-5) + 2e-5
    return -((1 - pt) ** 2) * math.log(pt)


def test_focal_loss_by_hand():
    # two pixels: a normal pixel with p_normal 0.8, a defect pixel with p_abnormal 0.3
    probs = torch.tensor([[[[0.8, 0.7]], [[0.2, 0.3]]]])  # [1, 2, 1, 2]
    target = torch.tensor([[[[0.0, 1.0]]]])  # [1, 1, 1, 2]
    expected = (focal_term(0.8) + focal_term(0.3)) / 2
    assert math.isclose(focal_loss(probs, target).item(), expected, rel_tol=1e-6)


def test_dice_loss_by_hand():
    probs = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]])  # [2, 2, 2]
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # sample 0: (2*1 + 1) / (1 + 2 + 1) = 3/4; sample 1: (0 + 1) / (1 + 0 + 1) = 1/2
    assert math.isclose(dice_loss(probs, target).item(), 1 - (0.75 + 0.5) / 2, rel_tol=1e-6)


def test_seg_loss_is_focal_plus_two_dice_terms():
    probs = torch.softmax(torch.randn(2, 2, 4, 4), dim=1)
    mask = (torch.rand(2, 1, 4, 4) > 0.7).float()
    expected = (
        focal_loss(probs, mask)
        + dice_loss(probs[:, 0], 1 - mask[:, 0])
        + dice_loss(probs[:, 1], mask[:, 0])
    )
    assert_close(calculate_seg_loss(probs, mask), expected)


def test_orthogonal_loss_by_hand():
    features = torch.zeros(2, 3, 2)
    features[0, :, 0] = torch.tensor([1.0, 0.0, 0.0])
    features[0, :, 1] = torch.tensor([0.5, math.sqrt(3) / 2, 0.0])  # cosine 0.5
    features[1, :, 0] = torch.tensor([1.0, 0.0, 0.0])
    features[1, :, 1] = torch.tensor([0.0, 1.0, 0.0])  # cosine 0
    assert math.isclose(orthogonal_loss(features).item(), 0.25**2, rel_tol=1e-6)


def test_train_map_is_a_softmax_of_scaled_cosines_at_the_grid_corners():
    patch = torch.nn.functional.normalize(torch.randn(1, 16, 8), dim=-1)  # 4 x 4 grid
    text = torch.nn.functional.normalize(torch.randn(8, 2), dim=0)
    maps = calculate_similarity_map(patch, text, img_size=13)  # [1, 2, 13, 13]
    scores = torch.softmax(100 * patch[0] @ text, dim=-1)  # [16, 2]
    # align_corners=True: the corner pixels sit exactly on the corner patches
    assert_close(maps[0, :, 0, 0], scores[0])
    assert_close(maps[0, :, -1, -1], scores[15])
    assert_close(maps.sum(1), torch.ones(1, 13, 13))


def test_test_map_of_a_constant_grid_is_abnormal_minus_normal():
    text = torch.eye(4)[:, :2]  # normal = e0, abnormal = e1
    patch = torch.tensor([0.6, 0.8, 0.0, 0.0]).expand(2, 64, 4)  # 8 x 8 grid, cos 0.6 / 0.8
    maps = calculate_similarity_map(patch, text, img_size=32, test=True)
    assert maps.shape == (2, 1, 32, 32)
    assert_close(maps, torch.full((2, 1, 32, 32), (80 + 1 - 60) / 2))


def test_minmax_normalize_rules():
    np.testing.assert_allclose(minmax_normalize(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])
    already = np.array([0.2, 1.0])  # max exactly 1: AA-CLIP leaves it alone
    np.testing.assert_array_equal(minmax_normalize(already), already)
    constant = np.full(3, 0.4)
    np.testing.assert_array_equal(minmax_normalize(constant), constant)
