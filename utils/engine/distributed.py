"""torchrun and DistributedDataParallel: where a process sits in a job, and global batches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from utils.core.errors import ConfigError
from utils.core.runtime import resolve_device


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torchrun job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str | None) -> Distributed:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK, if any.

    gloo on CPU, nccl on CUDA; with CUDA each process takes the GPU of its LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=resolve_device(device_name))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Distributed(rank=rank, world_size=world_size, device=device)


def barrier(dist: Distributed) -> None:
    """Wait for every rank (e.g. after rank 0 wrote metadata files)."""
    if dist.enabled:
        torch.distributed.barrier()


def shutdown_distributed(dist: Distributed) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class GlobalBatchSampler(Sampler[int]):
    """Shuffled indices of this rank's share of every global batch.

    The epoch's permutation comes from `seed + epoch`; it is cut into global batches of
    `global_batch_size`, and rank r takes positions `[r*b, (r+1)*b)` of each (b = global batch /
    world size). With one process this is a plain seeded shuffle; with N processes the union of
    the ranks' batches at every step equals the single-process batch, so DDP's averaged gradient
    equals the single-process gradient. With several ranks a last, partial global batch is
    padded from the start of the permutation (as DistributedSampler does) so every rank steps.
    """

    def __init__(self, size: int, global_batch_size: int, dist: Distributed, seed: int) -> None:
        if global_batch_size % dist.world_size:
            msg = (
                f"batch size {global_batch_size} is not divisible by the {dist.world_size} "
                "processes; batch sizes are global, pick a multiple of the process count"
            )
            raise ConfigError(msg)
        self.size = size
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dist.world_size
        self.dist = dist
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.dist.enabled and self.size % self.global_batch_size:
            missing = self.global_batch_size - self.size % self.global_batch_size
            order += (order * (missing // self.size + 1))[:missing]
        return order

    def __iter__(self):
        order = self._permutation()
        start = self.dist.rank * self.local_batch_size
        for offset in range(0, len(order), self.global_batch_size):
            yield from order[offset + start : offset + start + self.local_batch_size]

    def __len__(self) -> int:
        if not self.dist.enabled:
            return self.size
        return -(-self.size // self.global_batch_size) * self.local_batch_size
