"""SOWA training (single stage): HFWA adapters, prompt contexts and the fusion text Linear.

    python train_sowa.py                                    # tiny backbone on the synthetic set
    python train.py --model sowa --dataset VisA --shot 0    # ViT-L-14-336 (QuickGELU), 336 px
    python test.py --save_path ckpt/sowa --dataset MVTec --k_shot 4 --pro_variant sowa

Loss (spec sowa.md §5): `CE(text_probs, y) + Σ_stages [focal(P_s, m) + dice(P_s[1], m) +
dice(P_s[0], 1 - m)]`, all weights 1. The CE runs on probabilities that are already softmaxed, as
the original (`--no-ce_on_probabilities` runs it on the logits). AdamW over every trainable
parameter (no parameter groups: weight decay reaches LayerNorms, logit scales and contexts), with
ReduceLROnPlateau (factor 0.1, patience 5) on the epoch loss, which cannot act within the default
single epoch. Each epoch writes `sowa_<epoch>.pth` and `sowa.pth` with the trainable weights,
optimizer, scheduler, config and RNG states; re-running with the same `--save_path` resumes from
`sowa.pth` while epoch < `--epochs`. The original's MVTec mosaic augmentation is not reproduced
(`--augment` selects the project's geometric augmentation; off by default, as for VisA).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.anomaly import TrainDataset
from models.sowa import (
    MEMORY_FEATURES,
    MODEL_NAME,
    SOWA,
    STAGE_REDUCTIONS,
    SOWAOutput,
    build_sowa,
    load_sowa_state,
)
from utils.config import (
    CONFIG_DIR,
    add_clip_args,
    add_data_args,
    add_run_args,
    parse_with_config,
    resolve_backbone_defaults,
    save_yaml,
)
from utils.errors import ConfigError
from utils.forward_utils import calculate_seg_loss
from utils.runtime import (
    Distributed,
    autocast,
    grad_scaler,
    rng_state,
    seed_everything,
)
from utils.training import (
    add_training_data_args,
    build_train_loader,
    check_shot,
    global_mean,
    mean,
    resume_single_stage,
    run_config,
    run_main,
    save_epoch_checkpoints,
    start_epoch,
    training_records,
    wrap_ddp,
)

logger = logging.getLogger("train")

PAPER_IMG_SIZE = 336


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL_NAME, choices=(MODEL_NAME,))
    add_run_args(parser, "folder for checkpoints, train_sowa.log and config.yaml")
    parser.set_defaults(save_path=Path("ckpt/sowa"))
    add_data_args(parser, "training data set (the original: VisA's test split to test on MVTec)")
    add_training_data_args(parser)
    group = add_clip_args(parser, quick_gelu=True)
    group.add_argument(
        "--feature_map_idx",
        type=int,
        nargs="+",
        default=[5, 11, 17, 23],
        help="0-based vision blocks whose outputs are adapted (the outputs of blocks 6/12/18/24)",
    )
    group.add_argument("--window_size", type=int, default=12, help="adapter window in tokens")
    group.add_argument(
        "--num_heads", type=int, default=8, help="adapter heads; must divide the vision width"
    )
    group.add_argument("--depth", type=int, default=1, help="HFWA blocks per stage")
    group.add_argument("--cpb_dim", type=int, default=64, help="position-bias MLP width")
    group.add_argument("--prompt_length", type=int, default=12, help="learnable context tokens")
    group.add_argument(
        "--value_only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="V-V cosine attention (the original); no: Q-K cosine",
    )
    group.add_argument(
        "--in_proj_bias",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="use the block's in_proj_bias in the adapter (the original does not)",
    )
    group.add_argument(
        "--patch_ln_post",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ln_post on patch tokens before the projection (the original skips it)",
    )
    group.add_argument("--temperature", type=float, default=0.07, help="T of the image softmax")
    group.add_argument("--attn_drop", type=float, default=0.1, help="adapter attention dropout")
    group.add_argument(
        "--stage_reduce",
        default="sum",
        choices=STAGE_REDUCTIONS,
        help="test-time reduction of the stage maps (the original sums)",
    )
    group.add_argument(
        "--memory_features",
        default="raw",
        choices=MEMORY_FEATURES,
        help="k-shot memory on raw hooked tokens (the original) or adapted features",
    )
    group.add_argument(
        "--smooth_memory_map",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="smooth the k-shot map with the stage maps (the original adds it unsmoothed)",
    )
    group.add_argument(
        "--smoothing_sigma",
        type=float,
        default=4.0,
        help="test-time Gaussian sigma in pixels on the summed map (0: none)",
    )
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=1)
    training.add_argument("--batch_size", type=int, default=8, help="global batch size")
    training.add_argument("--lr", type=float, default=1e-3, help="AdamW lr")
    training.add_argument("--weight_decay", type=float, default=0.2, help="AdamW weight decay")
    training.add_argument(
        "--ce_on_probabilities",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="image CE on softmaxed probabilities (the original); no: on the logits",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), argv, CONFIG_DIR / "sowa.yaml")
    resolve_backbone_defaults(args, PAPER_IMG_SIZE)
    check_shot(args)
    if args.epochs < 0 or args.batch_size < 1:
        raise ConfigError(f"--epochs {args.epochs} must be >= 0 and --batch_size >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or not 0 <= args.attn_drop < 1:
        msg = "--lr must be > 0, --weight_decay >= 0 and --attn_drop in [0, 1)"
        raise ConfigError(msg)
    return args


def sowa_loss(
    output: SOWAOutput, mask: torch.Tensor, label: torch.Tensor, ce_on_probabilities: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, image CE, pixel loss summed over stages), float32 (spec §5).

    output: text probabilities/logits `[B, 2]`, stage probabilities `[B, 2, S, S]` each;
    mask `[B, 1, S, S]` (defect where > 0); label `[B]`.
    """
    with torch.autocast(mask.device.type, enabled=False):
        image_input = output.text_probs if ce_on_probabilities else output.text_logits
        ce_loss = F.cross_entropy(image_input.float(), label.long())
        target = (mask > 0).float()
        seg_loss = sum(calculate_seg_loss(probs.float(), target) for probs in output.stage_probs)
        return ce_loss + seg_loss, ce_loss, seg_loss


def build_optimizer(model: SOWA, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over all trainable parameters, one group (spec §5)."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return torch.optim.AdamW(
        parameters, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8
    )


def train_sowa(
    model: SOWA,
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    args: argparse.Namespace,
    dist: Distributed,
    first_epoch: int = 0,
) -> SOWA:
    """Epochs `first_epoch..epochs-1`; rank 0 saves `sowa_<epoch>.pth` and `sowa.pth`."""
    device = dist.device
    model.train()
    forward = wrap_ddp(model, dist)
    scaler = grad_scaler(device, args.amp)
    quiet = not dist.is_main
    for epoch in tqdm(range(first_epoch, args.epochs), desc="epochs", disable=quiet):
        start_epoch(train_loader, epoch, args.seed)
        losses, ce_losses, seg_losses = [], [], []
        batches = tqdm(train_loader, desc=f"epoch {epoch + 1}", leave=False, disable=quiet)
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            with autocast(device, args.amp):
                output = forward(images)
            loss, ce_loss, seg_loss = sowa_loss(output, mask, label, args.ce_on_probabilities)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(global_mean(loss, dist))
            ce_losses.append(global_mean(ce_loss, dist))
            seg_losses.append(global_mean(seg_loss, dist))
        scheduler.step(mean(losses))  # the original monitors train/loss once per epoch
        logger.info(
            "epoch %d/%d: loss %.4f (ce %.4f, seg %.4f)",
            epoch + 1,
            args.epochs,
            mean(losses),
            mean(ce_losses),
            mean(seg_losses),
        )
        if not dist.is_main:
            continue
        payload = {
            "epoch": epoch + 1,
            MODEL_NAME: model.trainable_state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": run_config(args),
            "rng": rng_state(),
        }
        save_epoch_checkpoints(args.save_path, MODEL_NAME, payload)
    return model


def run(args: argparse.Namespace, dist: Distributed) -> None:
    device = dist.device
    seed_everything(args.seed)
    records = training_records(args, dist)
    logger.info(
        "training SOWA on %s (%d records) with %s at %d px, hooks %s, on %s x %d, amp %s",
        args.dataset,
        len(records),
        args.model_name,
        args.img_size,
        args.feature_map_idx,
        device,
        dist.world_size,
        args.amp,
    )
    model = build_sowa(vars(args), device)
    # Same adapter initialisation on every rank (seed above); dropout streams differ per rank.
    torch.manual_seed(args.seed + dist.rank)
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=5
    )
    first_epoch = resume_single_stage(
        MODEL_NAME,
        lambda path, payload: load_sowa_state(model, path, payload, run_config(args)),
        optimizer,
        args,
        dist,
        scheduler,
    )
    if dist.is_main:  # after the resume check, so a refused run leaves the folder as it was
        args.save_path.mkdir(parents=True, exist_ok=True)
        save_yaml(args.save_path / "config.yaml", run_config(args))
    if first_epoch < args.epochs:
        dataset = TrainDataset(
            records, args.data_root, args.img_size, text=False, augment=args.augment
        )
        loader = build_train_loader(dataset, args.batch_size, args, dist)
        train_sowa(model, loader, optimizer, scheduler, args, dist, first_epoch)
    logger.info("checkpoints in %s", args.save_path)


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, log_name="train_sowa.log")


if __name__ == "__main__":
    raise SystemExit(main())
