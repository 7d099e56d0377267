"""Training-loop pieces that need no data: the stage-1 loss quirk and the LR schedule."""

from __future__ import annotations

import pytest
import torch

from models.aaclip import stage1_loss


def level_maps():
    return [torch.softmax(torch.randn(2, 2, 8, 8), dim=1).requires_grad_() for _ in range(4)]


def test_last_level_loss_ignores_the_first_levels():
    maps = level_maps()
    mask = (torch.rand(2, 1, 8, 8) > 0.8).float()
    text = torch.nn.functional.normalize(torch.randn(2, 4, 2), dim=1).requires_grad_()
    loss = stage1_loss(maps, mask, text, 0.1, "last_level")
    zeroed = [torch.zeros_like(level) for level in maps[:3]] + [maps[3]]
    assert torch.equal(loss, stage1_loss(zeroed, mask, text, 0.1, "last_level"))
    loss.backward()
    assert all(level.grad is None for level in maps[:3])
    assert maps[3].grad is not None and text.grad is not None


def test_sum_levels_loss_uses_every_level():
    maps = level_maps()
    mask = (torch.rand(2, 1, 8, 8) > 0.8).float()
    text = torch.nn.functional.normalize(torch.randn(2, 4, 2), dim=1)
    stage1_loss(maps, mask, text, 0.1, "sum_levels").backward()
    assert all(level.grad is not None and level.grad.abs().sum() > 0 for level in maps)


def test_multistep_schedule_halves_exactly_at_iteration_16000():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=5e-4, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [16000, 32000], gamma=0.5)
    optimizer.step()  # iteration 1's update; the original steps the scheduler after it
    for _ in range(15999):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_global_batch_sampler_splits_each_global_batch_across_ranks():
    from utils.engine.distributed import Distributed, GlobalBatchSampler

    single = GlobalBatchSampler(10, 4, Distributed(), seed=3)
    order = list(single)
    assert sorted(order) == list(range(10)) and len(single) == 10
    ranks = [GlobalBatchSampler(10, 4, Distributed(rank, 2), seed=3) for rank in range(2)]
    shares = [list(sampler) for sampler in ranks]
    assert all(
        len(share) == len(sampler) == 6 for share, sampler in zip(shares, ranks, strict=True)
    )
    for step in range(2):  # the full global batches are exactly the single-process batches
        union = shares[0][2 * step : 2 * step + 2] + shares[1][2 * step : 2 * step + 2]
        assert sorted(union) == sorted(order[4 * step : 4 * step + 4])
    single.set_epoch(1)
    assert list(single) != order
