"""The one training loop every model runs, and the plumbing around it: run settings, records,
loaders, DDP, checkpoints and resume.

A model (`models.base.FrozenCLIPModel`) says what its stages are and how each one trains;
`train_stage` runs one (prepare, optimizer, resume) and `fit` is its loop, in the shape of
open_clip's `train_one_epoch` and nanoGPT's: one autocast context around the forward, the
model's float32 loss, the scaler, the optimizer step, the scheduler, the log line, and an atomic
checkpoint after every epoch. Data selection (`--training_mode`, `--shot`), batching under
torchrun (global batch sizes), epoch seeding and rank-0-only outputs are the same for every model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from datasets.anomaly import TrainDataset
from datasets.catalog import DataConfig
from datasets.metadata import ensure_training_records, log_resized_masks
from datasets.synthetic import check_generatable, ensure_synthetic
from utils.core.checkpoint import (
    TRAIN_LOCK,
    check_writable,
    folder_lock,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from utils.core.config import (
    RUN,
    TRAIN,
    flag_hint,
    save_yaml,
    setting,
    settings_of,
    to_mapping,
    validate,
)
from utils.core.errors import ConfigError, TrainingDiverged
from utils.core.runtime import (
    RuntimeConfig,
    autocast,
    grad_scaler,
    loader_workers,
    progress,
    rng_state,
    run_script,
    set_rng_state,
    setup_logging,
)
from utils.engine.distributed import (
    Distributed,
    GlobalBatchSampler,
    barrier,
    init_distributed,
    shutdown_distributed,
)

if TYPE_CHECKING:
    from models.base import FrozenCLIPModel, Stage

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunConfig(RuntimeConfig, DataConfig):
    """A training run: how it runs (`RuntimeConfig`), what it reads (`DataConfig`), where it
    writes and which records it trains on (a model's `run_defaults` set its own defaults)."""

    save_path: Path = setting(
        Path("ckpt/aaclip"), "run folder: checkpoints, logs and config.yaml", kind=RUN
    )
    training_mode: str = setting(
        "few_shot",
        "few_shot (--shot images per class) or full_shot (the whole test split)",
        kind=RUN,
        choices=("few_shot", "full_shot"),
    )
    shot: int = setting(
        32, "k images per class (k/2 normal, k/2 anomalous); 0 means full shot", kind=RUN
    )
    augment: bool = setting(True, "random geometric (and colour) augmentation", kind=RUN)
    train_tile: int = setting(
        0,
        "train on a random S x S crop of each image at native resolution (and the same crop of "
        "its mask; a masked anomalous image's crop holds a defect), resized to the model input "
        "when S differs, so fine-tuning sees defects at the scale test.py --tile scores them "
        "(0: the whole image resized)",
        kind=RUN,
        minimum=0,
    )
    pixel_loss: str = setting(
        "on",
        "on: pixel losses on every image whose mask is known (an anomalous image without a mask "
        "has none and trains image losses only); off: image labels only, every mask ignored",
        kind=RUN,
        choices=("on", "off"),
    )

    def resolve(self) -> RunConfig:
        """Checked settings with the data root filled in (`--shot 0` means full shot)."""
        validate(self)
        if self.shot < 0:
            raise ConfigError(f"--shot {self.shot} must be >= 0 (0 means full shot)")
        default_shot = next(f.default for f in dataclasses.fields(self) if f.name == "shot")
        if self.training_mode == "full_shot" and self.shot not in (0, default_shot):
            raise ConfigError(
                f"--shot {self.shot} has no effect in full_shot mode (the whole test split; this "
                "model's default, as its original); pass --training_mode few_shot with it"
            )
        self.dataset_info()  # an unknown data set fails here, before any work
        changes: dict[str, Any] = {"data_root": self.root()}
        if self.shot == 0:
            changes["training_mode"] = "full_shot"
        return dataclasses.replace(self, **changes)


def checkpoint_config(model: FrozenCLIPModel, run: RunConfig) -> dict[str, Any]:
    """The settings stored in every checkpoint and in config.yaml: model name, model settings,
    run settings (paths as strings). A checkpoint alone rebuilds its model from them."""
    return {"model": model.name, **to_mapping(model.config), **to_mapping(run)}


# ---------------------------------------------------------------------------------------------
# Data


def training_records(run: RunConfig, dist: Distributed) -> list[dict]:
    """Rank 0 prepares the data root and metadata files first; the other ranks then read them."""

    def load() -> list[dict]:
        if run.dataset == "Synthetic":
            ensure_synthetic(run.data_root)
        records = ensure_training_records(
            run.dataset_info(),
            run.data_root,
            run.training_mode,
            run.shot,
            run.seed,
            run.metadata_dir,
        )
        if run.resize_masks:
            log_resized_masks(records, run.data_root)
        return records

    if dist.is_main:
        records = load()
    barrier(dist)
    if not dist.is_main:
        records = load()
    return records


def build_train_loader(
    dataset: Dataset, global_batch: int, run: RunConfig, dist: Distributed
) -> DataLoader:
    """Shuffled loader of this rank's share of each global batch of `dataset`.

    Batch sizes are global: with N processes each takes global_batch / N images per step.
    Sampler and worker seeds are re-seeded per epoch (`seed + epoch`, see `start_epoch`), so a
    resumed run draws the same batches as an uninterrupted one.
    """
    cuda = dist.device.type == "cuda"
    workers = loader_workers(run.num_workers, dist.device)
    sampler = GlobalBatchSampler(len(dataset), global_batch, dist, run.seed)
    return DataLoader(
        dataset,
        batch_size=sampler.local_batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(run.seed),
    )


def start_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Seed the epoch's shuffle and worker seeds from `seed + epoch` alone."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed + epoch)


# ---------------------------------------------------------------------------------------------
# Distributed


class StageForward(nn.Module):
    """A stage's forward as a module of its own, so DistributedDataParallel can wrap it."""

    def __init__(self, model: FrozenCLIPModel, stage: Stage) -> None:
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model.forward_train(batch, self.stage)


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


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_stage(
    model: FrozenCLIPModel,
    stage: Stage,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    run: RunConfig,
    loss: float | None = None,
    best_loss: float | None = None,
) -> float | None:
    """`<stem>.pth` (the resume point) and, per stage, `<stem>_<epoch>.pth`, atomically: the
    stage's weights under the original keys, optimizer, scheduler, config, RNG states and the
    epoch's mean training loss. A stage that keeps its lowest-loss epoch (`Stage.keep`, the
    FE-CLIP fork's choice) also writes `<stem>_best.pth` when `loss` beats `best_loss`, the file
    test.py and predict.py then read. Returns the best loss so far."""
    if stage.keep == "lowest_loss" and loss is not None:
        improved = best_loss is None or loss < best_loss
        best_loss = loss if improved else best_loss
    payload = {
        "epoch": epoch,
        **model.stage_state(stage),
        stage.optimizer_key: optimizer.state_dict(),
        "config": checkpoint_config(model, run),
        "rng": rng_state(),
        "loss": loss,
        "best_loss": best_loss,
    }
    if scheduler is not None:
        payload[stage.scheduler_key] = scheduler.state_dict()
    if stage.per_epoch_files:
        save_checkpoint(run.save_path / f"{stage.stem}_{epoch}.pth", payload)
    if stage.keep == "lowest_loss" and loss is not None and best_loss == loss:
        save_checkpoint(run.save_path / f"{stage.stem}_best.pth", payload)
    save_checkpoint(run.save_path / f"{stage.stem}.pth", payload)
    return best_loss


# Run settings that make a resumed run another run (its provenance: results record them).
RESUME_FIXED = ("seed", "dataset", "training_mode", "shot", "augment", "train_tile")


def check_same_run(path: Path, saved: dict | None, model: FrozenCLIPModel, run: RunConfig) -> None:
    """Refuse to resume a checkpoint with settings that alter the run: its seed, data (data set,
    mode, shot, augmentation) or training recipe; the epoch counts may grow (that is how a run
    is extended). Files of the original code carry no config and pass."""
    if not saved:
        return
    current = checkpoint_config(model, run)
    recipe = [field.name for field in settings_of(type(model.config), (TRAIN,))]
    for key in (*RESUME_FIXED, *recipe):
        if key.endswith("epoch") or key == "epochs" or key not in saved:
            continue
        if saved[key] != current[key]:
            raise ConfigError(
                f"{path} belongs to a run with {key}={saved[key]!r}, not {current[key]!r}: "
                f"resuming would mix two runs; pass {flag_hint(None, key, saved[key])} or a new "
                "--save_path"
            )


def resume(
    model: FrozenCLIPModel,
    stage: Stage,
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    dist: Distributed,
    run: RunConfig,
) -> tuple[int, float | None]:
    """Load a stage checkpoint (weights, optimizer, scheduler, RNG); the epoch to start at and
    the best epoch loss so far (lowest-loss stages)."""
    payload = load_checkpoint(path, map_location=dist.device, trust=run.trust_checkpoint)
    model.load_stage_state(stage, payload, path)
    check_same_run(path, payload.get("config"), model, run)
    if stage.optimizer_key in payload:
        optimizer.load_state_dict(payload[stage.optimizer_key])
    else:
        logger.warning("%s has no optimizer state: the optimizer starts fresh", path)
    if scheduler is not None:
        if stage.scheduler_key in payload:
            scheduler.load_state_dict(payload[stage.scheduler_key])
        else:
            logger.warning("%s has no scheduler state (original format): the LR restarts", path)
    if "rng" in payload and not dist.enabled:
        # Rank 0's saved stream would make every rank's augmentation identical; under torchrun
        # the ranks keep their own seeds and a resumed run is close to, not equal to, a fresh one.
        set_rng_state(payload["rng"])
    logger.warning(
        "resuming %s stage (%s) from %s after epoch %d",
        stage.name,
        stage.stem,
        path,
        payload["epoch"],
    )
    return int(payload["epoch"]), payload.get("best_loss")


def write_run_config(model: FrozenCLIPModel, run: RunConfig, dist: Distributed) -> None:
    """config.yaml in the save path (rank 0), once training is about to change it."""
    if dist.is_main:
        run.save_path.mkdir(parents=True, exist_ok=True)
        save_yaml(run.save_path / "config.yaml", checkpoint_config(model, run))


# ---------------------------------------------------------------------------------------------
# The loop


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def training_step(
    forward: nn.Module,
    model: FrozenCLIPModel,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: str,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """One optimizer step: the stage's forward under the one autocast context, the model's
    float32 loss, the scaled backward, the step. Returns the loss terms averaged over ranks.

    A non-finite loss stops before the backward (every rank sees the same averaged value, so
    they stop together), and so does an fp16 loss scale driven below 1 (the gradients overflow
    at every step, beyond what the scaler's own step skipping can absorb): TrainingDiverged.
    """
    dist = dist or Distributed(device=model.device)
    with autocast(model.device, amp):
        output = forward(batch)
    losses = model.loss(output, batch)
    total = global_mean(losses["loss"], dist)
    if not math.isfinite(total):
        raise TrainingDiverged(f"the loss is {total}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    if scaler.is_enabled() and scaler.get_scale() < 1.0:
        raise TrainingDiverged("fp16 gradients overflow at every step (loss scale below 1)")
    terms = {name: global_mean(value, dist) for name, value in losses.items() if name != "loss"}
    return {"loss": total, **terms}


def _check_finite_weights(model: FrozenCLIPModel, stage: Stage) -> None:
    for key, state in model.stage_state(stage).items():
        tensors = state.values() if isinstance(state, dict) else [state]
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
            raise TrainingDiverged(f"the {key} weights are no longer finite")


def fit(
    model: FrozenCLIPModel,
    stage: Stage,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    run: RunConfig,
    dist: Distributed,
    first_epoch: int = 0,
    best_loss: float | None = None,
) -> None:
    """Train one stage for epochs `first_epoch..stage.epochs - 1`; rank 0 logs and saves after
    every epoch (`save_stage`). A diverging run stops with one line naming the epoch and step;
    the checkpoints already written (all finite) are kept."""
    device = dist.device
    forward = wrap_ddp(StageForward(model, stage), dist)
    scaler = grad_scaler(device, run.amp)
    model.train()
    bars = run.progress and dist.is_main
    epochs = progress(range(first_epoch, stage.epochs), bars, desc=f"{stage.name} epochs")
    for epoch in epochs:
        start_epoch(loader, epoch, run.seed)
        terms: dict[str, list[float]] = {}
        batches = progress(loader, bars, desc=f"{stage.log_prefix}epoch {epoch + 1}", leave=False)
        for step, batch in enumerate(batches, start=1):
            try:
                losses = training_step(
                    forward, model, _to_device(batch, device), optimizer, scaler, run.amp, dist
                )
                if step == len(loader):
                    _check_finite_weights(model, stage)
            except TrainingDiverged as error:
                kept = run.save_path / f"{stage.stem}.pth"
                last = f"{kept} (epoch {epoch}) is kept" if epoch else f"no {kept.name} was written"
                raise TrainingDiverged(
                    f"{error} at {stage.log_prefix}epoch {epoch + 1}/{stage.epochs}, step "
                    f"{step}/{len(loader)}; {last}; try a lower {stage.lr_flag}, or --amp none"
                ) from None
            if scheduler is not None and stage.scheduler_interval == "step":
                scheduler.step()
            for name, value in losses.items():
                terms.setdefault(name, []).append(value)
        epoch_loss = mean(terms.get("loss", []))
        if scheduler is not None and stage.scheduler_interval == "epoch":
            scheduler.step(epoch_loss)  # the original monitors the epoch's mean loss
        extras = ", ".join(
            f"{name} {mean(values):.4f}" for name, values in terms.items() if name != "loss"
        )
        logger.info(
            "%sepoch %d/%d: loss %.4f%s",
            stage.log_prefix,
            epoch + 1,
            stage.epochs,
            epoch_loss,
            f" ({extras})" if extras else "",
        )
        if dist.is_main:
            best_loss = save_stage(
                model, stage, epoch + 1, optimizer, scheduler, run, epoch_loss, best_loss
            )


def check_targets(stage: Stage, records: list[dict], pixel: bool) -> None:
    """Log what each loss trains on: pixel losses on the images whose mask is known (all but
    anomalous images without a mask; none with `pixel` False), image losses on every image when
    the stage has them. A stage without an image-level loss and without one known defect mask
    would only learn "no defect anywhere": refused in one line."""
    anomalous = sum(1 for record in records if int(record["label"]) == 1)
    masked = sum(1 for record in records if int(record["label"]) == 1 and record.get("mask_path"))
    known = len(records) - anomalous + masked if pixel else 0
    name = stage.title.split(":")[0] or stage.name
    if not stage.image_loss and anomalous and (masked == 0 or not pixel):
        why = f"none of its {anomalous} anomalous images has a mask"
        why = why if pixel else "--pixel_loss off"
        fix = f"pass {stage.image_loss_flag}" if stage.image_loss_flag else "train another model"
        raise ConfigError(
            f"{name} learns from defect masks only (it has no image-level loss) and {why}: give "
            f"masks (--mask_dir), or {fix}"
        )
    logger.info(
        "%s: pixel losses on %d of %d images (%d anomalous without a mask%s), image losses on %d",
        name,
        known,
        len(records),
        anomalous - masked,
        "; --pixel_loss off" if not pixel else "",
        len(records) if stage.image_loss else 0,
    )
    if pixel and not stage.image_loss and masked < anomalous:
        logger.warning(
            "%s has no image-level loss: its %d anomalous images without a mask teach it nothing",
            name,
            anomalous - masked,
        )


def train_stage(
    model: FrozenCLIPModel,
    stage: Stage,
    records: list[dict],
    run: RunConfig,
    dist: Distributed,
) -> None:
    """One stage of `model`: prepare it, build its optimizer (`model.start_optimizer` may seed
    it: the cross-attention variant's base moments), resume from the save path's `<stem>.pth`
    (train while epoch < total), `fit`. config.yaml is written just before epochs train, so a
    refused run leaves the folder as it was."""
    model.prepare_stage(stage, run.dataset_info())
    optimizer, scheduler = model.configure_optimizer(stage)
    model.start_optimizer(stage, optimizer)
    path = run.save_path / f"{stage.stem}.pth"
    start, best_loss = 0, None
    if path.is_file():
        start, best_loss = resume(model, stage, path, optimizer, scheduler, dist, run)
    if start < stage.epochs:
        check_targets(stage, records, run.pixel_loss == "on")
        write_run_config(model, run, dist)
        dataset = TrainDataset(
            records,
            run.data_root,
            model.preprocessing(train=True, resize_masks=run.resize_masks),
            color_jitter=stage.color_jitter,
            augment=run.augment,
            pixel_loss=run.pixel_loss == "on",
            tile=run.train_tile,
        )
        loader = build_train_loader(dataset, stage.batch_size, run, dist)
        fit(model, stage, loader, optimizer, scheduler, run, dist, start, best_loss)
    elif not path.is_file() and model.skip_stage(stage) and dist.is_main:
        save_stage(model, stage, 0, optimizer, scheduler, run)


# ---------------------------------------------------------------------------------------------
# Script entry


class Job(Protocol):
    """A parsed training command: its run settings and log file name."""

    run: RunConfig
    log_file: str


def run_main(
    parse: Callable[[list[str] | None], Job],
    execute: Callable[[Job, Distributed], None],
    argv: list[str] | None,
) -> int:
    """A training script's `main`: parse, join torchrun, check the save path is writable, log
    (rank 0 only), clean the temporaries of killed saves, hold the run lock, run.

    A `UserError` becomes one logged line and exit status 2; Ctrl-C 130, SIGTERM 143.
    """
    setup_logging()
    joined: list[Distributed] = []

    def body() -> None:
        job = parse(argv)
        dist = init_distributed(job.run.device)
        joined.append(dist)
        if not dist.is_main:
            setup_logging(None, "WARNING")
            execute(job, dist)
            return
        save_path = job.run.save_path
        if job.run.dataset == "Synthetic":  # generated on first use: a writable data root
            check_generatable(job.run.data_root)
        check_writable(save_path, "--save_path")  # before any work, not after an hour
        setup_logging(save_path / job.log_file, job.run.log_level)
        remove_stale_temporaries(save_path)
        with folder_lock(save_path, TRAIN_LOCK, "training", "--save_path"):
            execute(job, dist)

    try:
        return run_script(body, logging.getLogger("train"))
    finally:
        for dist in joined:
            shutdown_distributed(dist)
