"""DataLoader worker defaults: training as before, evaluation from the device and the cores."""

from __future__ import annotations

import os

import pytest
import torch

from utils.core.runtime import loader_workers

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("cores", "cpu", "cuda"), [(1, 0, 1), (2, 0, 1), (8, 1, 7), (16, 2, 15), (64, 8, 16)]
)
def test_evaluation_workers_follow_the_cores(monkeypatch, cores, cpu, cuda):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert loader_workers(None, CPU, evaluation=True) == cpu
    assert loader_workers(None, CUDA, evaluation=True) == cuda
    assert (loader_workers(None, CPU), loader_workers(None, CUDA)) == (0, 4)  # training
    assert loader_workers(3, CUDA, evaluation=True) == 3  # --num_workers wins
