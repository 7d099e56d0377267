"""Training plumbing every training script shares: flags, records, loaders, DDP, resume.

`train.py` (AA-CLIP), `train_cross_attention.py`, `train_feclip.py` and `train_sowa.py` build
their loops from these pieces, so data selection (`--training_mode`, `--shot`), batching under
torchrun (global batch sizes), epoch seeding and rank-0-only outputs behave the same for every
model.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from datasets.catalog import default_data_root, get_dataset_info
from datasets.metadata import ensure_training_records
from datasets.synthetic import ensure_synthetic
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import ConfigError, UserError
from utils.runtime import (
    Distributed,
    GlobalBatchSampler,
    barrier,
    init_distributed,
    set_rng_state,
    setup_logging,
    shutdown_distributed,
)

logger = logging.getLogger(__name__)


def add_training_data_args(parser: argparse.ArgumentParser) -> None:
    """`--training_mode`, `--shot`, `--augment`, `--amp`: the same meaning for every model."""
    parser.add_argument("--training_mode", default="few_shot", choices=("few_shot", "full_shot"))
    parser.add_argument(
        "--shot",
        type=int,
        default=32,
        help="k images per class (k/2 normal, k/2 anomalous); 0 means full shot",
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random geometric (and colour) augmentation",
    )
    parser.add_argument(
        "--amp",
        default="none",
        choices=("none", "bf16", "fp16"),
        help="autocast for the backbone (fp32 by default, as the originals); maps and losses "
        "stay float32",
    )


def check_shot(args: argparse.Namespace) -> None:
    """`--shot 0` means full shot; a negative shot is an error."""
    if args.shot < 0:
        raise ConfigError(f"--shot {args.shot} must be >= 0 (0 means full shot)")
    if args.shot == 0:
        args.training_mode = "full_shot"


def run_config(args: argparse.Namespace) -> dict:
    """The settings stored in every checkpoint and in config.yaml (paths as strings)."""
    return {
        key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
    }


def build_train_loader(
    dataset: Dataset, global_batch: int, args: argparse.Namespace, dist: Distributed
) -> DataLoader:
    """Shuffled loader of this rank's share of each global batch of `dataset`.

    Batch sizes are global: with N processes each takes global_batch / N images per step.
    Sampler and worker seeds are re-seeded per epoch (`seed + epoch`, see `start_epoch`), so a
    resumed run draws the same batches as an uninterrupted one.
    """
    cuda = dist.device.type == "cuda"
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    sampler = GlobalBatchSampler(len(dataset), global_batch, dist, args.seed)
    return DataLoader(
        dataset,
        batch_size=sampler.local_batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(args.seed),
    )


def start_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Seed the epoch's shuffle and worker seeds from `seed + epoch` alone."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed + epoch)


def wrap_ddp(module: nn.Module, dist: Distributed) -> nn.Module:
    """DistributedDataParallel over the module's trainable parameters (identity alone)."""
    if not dist.enabled:
        return module
    device_ids = [dist.device] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def global_mean(value: torch.Tensor, dist: Distributed) -> float:
    """A per-rank loss averaged over ranks: the single-process loss of the global batch."""
    value = value.detach()
    if dist.enabled:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= dist.world_size
    return value.item()


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def prepare_data_root(args: argparse.Namespace) -> None:
    """Default the data root to data/<dataset>; generate the synthetic set on first use."""
    get_dataset_info(args.dataset)
    if args.data_root is None:
        args.data_root = default_data_root(args.dataset)
    if args.dataset == "Synthetic":
        ensure_synthetic(args.data_root)


def training_records(args: argparse.Namespace, dist: Distributed) -> list[dict]:
    """Rank 0 prepares the data root and metadata files first; the other ranks then read them."""

    def load() -> list[dict]:
        prepare_data_root(args)
        return ensure_training_records(
            args.dataset,
            args.data_root,
            args.training_mode,
            args.shot,
            args.seed,
            args.metadata_dir,
        )

    if dist.is_main:
        records = load()
    barrier(dist)
    if not dist.is_main:
        records = load()
    return records


def run_main(
    parse: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace, Distributed], None],
    argv: list[str] | None,
    log_name: str = "train.log",
) -> int:
    """A training script's `main`: parse, join torchrun, log (rank 0 only), run.

    A `UserError` becomes one logged line and exit status 2.
    """
    setup_logging()
    dist = None
    try:
        args = parse(argv)
        dist = init_distributed(args.device)
        if dist.is_main:
            setup_logging(args.save_path / log_name, args.log_level)
        else:
            setup_logging(None, "WARNING")
        run(args, dist)
    except UserError as error:
        # Errors raised in DataLoader workers arrive wrapped; the last line is the message.
        logging.getLogger("train").error("%s", str(error).strip().splitlines()[-1])
        return 2
    finally:
        if dist is not None:
            shutdown_distributed(dist)
    return 0


def save_epoch_checkpoints(save_path: Path, stem: str, payload: dict) -> None:
    """`<stem>_<epoch>.pth` and `<stem>.pth` (the resume point), both written atomically."""
    save_checkpoint(save_path / f"{stem}_{payload['epoch']}.pth", payload)
    save_checkpoint(save_path / f"{stem}.pth", payload)


def resume_single_stage(
    stem: str,
    load_state: Callable[[Path, dict], None],
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    dist: Distributed,
    scheduler: object | None = None,
) -> int:
    """Resume a single-stage run from `<save_path>/<stem>.pth` if present; the epoch to start at.

    `load_state(path, payload)` checks the config and loads the model's trainable weights.
    """
    path = args.save_path / f"{stem}.pth"
    if not path.is_file():
        return 0
    payload = load_checkpoint(path, map_location=dist.device)
    load_state(path, payload)
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and "scheduler" in payload:
        scheduler.load_state_dict(payload["scheduler"])
    if "rng" in payload and not dist.enabled:
        # As train.py: under torchrun the ranks keep their own seeds.
        set_rng_state(payload["rng"])
    logger.warning("resuming %s from %s after epoch %d", stem, path, payload["epoch"])
    return int(payload["epoch"])
