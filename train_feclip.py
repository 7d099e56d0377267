"""FE-CLIP training (single stage): FFE + LFS adapters at the tap blocks and `fc_patch`.

    python train_feclip.py                               # tiny backbone on the synthetic set
    python train.py --model feclip --dataset MVTec --shot 0   # ViT-L-14-336 + openai, 336 px
    python test.py --save_path ckpt/feclip --dataset VisA

Loss (spec feclip.md §10, the paper's Eq. 4/5: per-tap losses averaged over taps): BCE with logits
on each tap's image margin logit, plus focal + dice on each tap's anomaly probability map
upsampled bilinearly to the input size. Adam, no scheduler; `fc_patch` at `--fc_patch_lr_ratio`
of `--lr` (the fork's 1/100). Each epoch writes `feclip_<epoch>.pth` and `feclip.pth` with the
trainable weights, optimizer, config and RNG states; re-running with the same `--save_path`
resumes from `feclip.pth` while epoch < `--epochs`.
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
from models.feclip import (
    FECLIP,
    LFS_AGGREGATIONS,
    MODEL_NAME,
    TapLogits,
    build_feclip,
    load_feclip_state,
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
from utils.forward_utils import binary_focal_loss, dice_loss
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
    add_run_args(parser, "folder for checkpoints, train_feclip.log and config.yaml")
    parser.set_defaults(save_path=Path("ckpt/feclip"))
    add_data_args(parser, "training data set (paper: MVTec test split; VisA for the MVTec row)")
    add_training_data_args(parser)
    group = add_clip_args(parser, quick_gelu=True)
    group.add_argument(
        "--tap_indices",
        type=int,
        nargs="+",
        default=[15, 18, 21, 23],
        help="0-based vision blocks followed by FFE + LFS (paper's likely reading: 5 11 17 23)",
    )
    group.add_argument("--lambda_fuse", type=float, default=0.1, help="λ of the fusion")
    group.add_argument("--ffe_window", type=int, default=3, help="P, FFE window side")
    group.add_argument("--lfs_window", type=int, default=3, help="Q, LFS window side (odd)")
    group.add_argument("--lfs_agg", default="mean", choices=LFS_AGGREGATIONS)
    group.add_argument("--lfs_pad", default="replicate", choices=("replicate", "zero"))
    group.add_argument("--ffe_pad", default="replicate", choices=("replicate", "zero"))
    group.add_argument("--temperature", "--tau", type=float, default=0.07, help="τ")
    group.add_argument(
        "--prompts",
        nargs=2,
        default=["A photo of a normal object", "A photo of a damaged object"],
        metavar=("NORMAL", "ABNORMAL"),
    )
    group.add_argument(
        "--patch_ln_post",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="frozen ln_post before fc_patch (the fork)",
    )
    group.add_argument(
        "--smoothing_sigma",
        type=float,
        default=0.0,
        help="test-time Gaussian blur of the map in pixels (0: none)",
    )
    group.add_argument("--token_valid_frac", type=float, default=0.5)
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=9)
    training.add_argument("--batch_size", type=int, default=16, help="global batch size")
    training.add_argument("--lr", type=float, default=5e-4, help="Adam lr of FFE and LFS")
    training.add_argument(
        "--fc_patch_lr_ratio",
        type=float,
        default=0.01,
        help="fc_patch lr = lr x this (fork: 1/100; 1: same lr; 0: frozen)",
    )
    training.add_argument("--w_cls", type=float, default=1.0)
    training.add_argument("--w_mask", type=float, default=1.0)
    training.add_argument("--focal_gamma", type=float, default=2.0)
    training.add_argument(
        "--focal_alpha",
        type=float,
        default=None,
        help="positive-class focal weight (default none, AnomalyCLIP; the fork: 0.25)",
    )
    training.add_argument("--dice_smooth", type=float, default=1.0, help="fork: 1e-6")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), argv, CONFIG_DIR / "feclip.yaml")
    resolve_backbone_defaults(args, PAPER_IMG_SIZE)
    check_shot(args)
    if args.epochs < 0 or args.batch_size < 1:
        raise ConfigError(f"--epochs {args.epochs} must be >= 0 and --batch_size >= 1")
    if args.lfs_window % 2 == 0 or args.lfs_window < 1 or args.ffe_window < 1:
        msg = f"--lfs_window {args.lfs_window} must be odd and --ffe_window >= 1"
        raise ConfigError(msg)
    if args.fc_patch_lr_ratio < 0:
        raise ConfigError(f"--fc_patch_lr_ratio {args.fc_patch_lr_ratio} must be >= 0")
    return args


def feclip_loss(
    output: TapLogits,
    mask: torch.Tensor,
    label: torch.Tensor,
    args: argparse.Namespace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, L_cls, L_mask), float32, each averaged over taps (spec §10).

    output: image logits `[N, B]`, patch logits `[N, B, g, g]`; mask `[B, 1, S, S]`; label `[B]`.
    """
    with torch.autocast(mask.device.type, enabled=False):
        image_logits = output.image_logits.float()
        taps = image_logits.shape[0]
        targets = label.float().expand(taps, -1)  # [N, B]
        cls_loss = F.binary_cross_entropy_with_logits(image_logits, targets)
        ground_truth = (mask > 0.5).float()  # [B, 1, S, S]
        probs = torch.sigmoid(output.patch_logits.float())  # [N, B, g, g]
        mask_loss = mask.new_zeros(())
        for tap_probs in probs:
            upsampled = F.interpolate(
                tap_probs[:, None], size=mask.shape[-2:], mode="bilinear", align_corners=False
            )  # [B, 1, S, S]
            mask_loss = mask_loss + binary_focal_loss(
                upsampled, ground_truth, args.focal_gamma, args.focal_alpha
            )
            mask_loss = mask_loss + dice_loss(upsampled, ground_truth, args.dice_smooth)
        mask_loss = mask_loss / taps
        return args.w_cls * cls_loss + args.w_mask * mask_loss, cls_loss, mask_loss


def build_optimizer(model: FECLIP, args: argparse.Namespace) -> torch.optim.Adam:
    """Adam over FFE + LFS at `lr` and `fc_patch` at `lr x fc_patch_lr_ratio` (0: frozen)."""
    model.requires_grad_(False)
    adapters = [*model.ffe.parameters(), *model.lfs.parameters()]
    for parameter in adapters:
        parameter.requires_grad_(True)
    groups = [{"params": adapters, "lr": args.lr}]
    if args.fc_patch_lr_ratio > 0:
        model.fc_patch.requires_grad_(True)
        groups.append(
            {"params": list(model.fc_patch.parameters()), "lr": args.lr * args.fc_patch_lr_ratio}
        )
    return torch.optim.Adam(groups)


def train_feclip(
    model: FECLIP,
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    dist: Distributed,
    first_epoch: int = 0,
) -> FECLIP:
    """Epochs `first_epoch..epochs-1`; rank 0 saves `feclip_<epoch>.pth` and `feclip.pth`."""
    device = dist.device
    model.train()
    forward = wrap_ddp(model, dist)
    scaler = grad_scaler(device, args.amp)
    quiet = not dist.is_main
    for epoch in tqdm(range(first_epoch, args.epochs), desc="epochs", disable=quiet):
        start_epoch(train_loader, epoch, args.seed)
        losses, cls_losses, mask_losses = [], [], []
        batches = tqdm(train_loader, desc=f"epoch {epoch + 1}", leave=False, disable=quiet)
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            with autocast(device, args.amp):
                output = forward(images)
            loss, cls_loss, mask_loss = feclip_loss(output, mask, label, args)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(global_mean(loss, dist))
            cls_losses.append(global_mean(cls_loss, dist))
            mask_losses.append(global_mean(mask_loss, dist))
        logger.info(
            "epoch %d/%d: loss %.4f (cls %.4f, mask %.4f)",
            epoch + 1,
            args.epochs,
            mean(losses),
            mean(cls_losses),
            mean(mask_losses),
        )
        if not dist.is_main:
            continue
        payload = {
            "epoch": epoch + 1,
            MODEL_NAME: model.trainable_state_dict(),
            "optimizer": optimizer.state_dict(),
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
        "training FE-CLIP on %s (%d records) with %s at %d px, taps %s, on %s x %d, amp %s",
        args.dataset,
        len(records),
        args.model_name,
        args.img_size,
        args.tap_indices,
        device,
        dist.world_size,
        args.amp,
    )
    try:
        model = build_feclip(vars(args), device)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    # Same adapter initialisation on every rank (seed above); augmentation streams differ per rank.
    torch.manual_seed(args.seed + dist.rank)
    optimizer = build_optimizer(model, args)
    first_epoch = resume_single_stage(
        MODEL_NAME,
        lambda path, payload: load_feclip_state(model, path, payload, run_config(args)),
        optimizer,
        args,
        dist,
    )
    if dist.is_main:  # after the resume check, so a refused run leaves the folder as it was
        args.save_path.mkdir(parents=True, exist_ok=True)
        save_yaml(args.save_path / "config.yaml", run_config(args))
    if first_epoch < args.epochs:
        dataset = TrainDataset(
            records, args.data_root, args.img_size, text=False, augment=args.augment
        )
        loader = build_train_loader(dataset, args.batch_size, args, dist)
        train_feclip(model, loader, optimizer, args, dist, first_epoch)
    logger.info("checkpoints in %s", args.save_path)


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, log_name="train_feclip.log")


if __name__ == "__main__":
    raise SystemExit(main())
