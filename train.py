"""AA-CLIP two-stage training: text adapters (stage 1), then image adapters (stage 2).

    python train.py                                  # tiny backbone on the synthetic set
    python train.py --dataset VisA --shot 32         # ViT-L-14-336 + openai weights, 518 px

Quirks of the original training loop reproduced by default (spec aaclip.md §17):
* `--stage1_loss last_level`: the original overwrites the loss inside its level loop, so only the
  last level's segmentation loss (+ one orthogonal term) trains the text adapters;
  `sum_levels` sums all levels. The paper's stage-1 L_cls is absent; `--stage1_cls_loss` adds it.
* `--cls_logit_scale 1`: stage-2 cross-entropy on un-scaled cosine logits.
Resume from `--save_path` follows the corrected rule (train while epoch < total) and restores
the optimizer, the LR scheduler and the RNG states; the original skipped a stage-1 epoch and
restarted the scheduler (§13).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.anomaly import TrainDataset
from models.aaclip import AdaptedCLIP, build_aaclip, load_adapter
from utils.checkpoint import save_checkpoint
from utils.config import (
    CONFIG_DIR,
    add_backbone_args,
    add_data_args,
    add_run_args,
    load_yaml,
    parse_with_config,
    resolve_backbone_defaults,
    save_yaml,
)
from utils.errors import ConfigError, UserError
from utils.forward_utils import (
    calculate_seg_loss,
    calculate_similarity_map,
    get_adapted_single_class_text_embedding,
    get_adapted_text_embedding,
    orthogonal_loss,
)
from utils.runtime import (
    Distributed,
    autocast,
    grad_scaler,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_logging,
)
from utils.training import (
    add_training_data_args,
    build_train_loader,
    check_shot,
    global_mean,
    mean,
    run_config,
    run_main,
    start_epoch,
    training_records,
    wrap_ddp,
)

logger = logging.getLogger("train")

# Sibling models train in their own scripts; `train.py --model NAME` hands the command line over.
TRAINERS: dict[str, str] = {
    "aaclip_cross_attn": "train_cross_attention",
    "feclip": "train_feclip",
    "sowa": "train_sowa",
}


def build_parser(model: str = "aaclip", description: str | None = None) -> argparse.ArgumentParser:
    """AA-CLIP's flags; the cross-attention script builds on them under its own model name."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
    parser.add_argument("--model", default=model, choices=(model,))
    add_run_args(parser, "folder for checkpoints, train.log and config.yaml")
    add_data_args(parser, "training data set (paper: VisA, or MVTec for the VisA row)")
    add_training_data_args(parser)
    add_backbone_args(parser)
    stage1 = parser.add_argument_group("stage 1 (text adapters)")
    stage1.add_argument("--text_epoch", type=int, default=5)
    stage1.add_argument("--text_batch_size", type=int, default=16)
    stage1.add_argument("--text_lr", type=float, default=1e-5)
    stage1.add_argument(
        "--text_norm_weight",
        type=float,
        default=0.1,
        help="weight of the orthogonal (disentangle) loss",
    )
    stage1.add_argument("--surgery_until_layer", type=int, default=20)
    stage1.add_argument(
        "--surgery_attention",
        default="batch_mix",
        choices=("batch_mix", "per_image"),
        help="batch_mix reproduces the original's softmax over the batch",
    )
    stage1.add_argument(
        "--stage1_loss",
        default="last_level",
        choices=("last_level", "sum_levels"),
        help="last_level reproduces the original (only the last level trains)",
    )
    stage1.add_argument(
        "--stage1_cls_loss",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="add the paper's L_cls on the clean CLS embedding (absent in code)",
    )
    stage2 = parser.add_argument_group("stage 2 (image adapters)")
    stage2.add_argument("--image_epoch", type=int, default=20)
    stage2.add_argument("--image_batch_size", type=int, default=2)
    stage2.add_argument("--image_lr", type=float, default=5e-4)
    stage2.add_argument(
        "--image_milestones",
        type=int,
        nargs="*",
        default=[16000, 32000],
        help="MultiStepLR milestones in iterations",
    )
    stage2.add_argument("--image_gamma", type=float, default=0.5)
    stage2.add_argument(
        "--cls_logit_scale",
        type=float,
        default=1.0,
        help="scale of the stage-2 CE logits (original: 1, un-scaled cosines)",
    )
    parser.add_argument("--betas", type=float, nargs=2, default=[0.5, 0.999])
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), argv, CONFIG_DIR / "aaclip.yaml")
    resolve_backbone_defaults(args)
    check_shot(args)
    return args


def aaclip_loader(
    records: list[dict], args: argparse.Namespace, text: bool, dist: Distributed
) -> DataLoader:
    """Stage-1 (`text=True`) or stage-2 loader over the training records (global batches)."""
    dataset = TrainDataset(records, args.data_root, args.img_size, text=text, augment=args.augment)
    batch = args.text_batch_size if text else args.image_batch_size
    return build_train_loader(dataset, batch, args, dist)


class TextAnchors(nn.Module):
    """Stage-1 forward: class anchors `[C, D, 2]` with gradient through the text adapters.

    A module of its own so that DistributedDataParallel can wrap the stage-1 computation.
    `image_contexts` (one `[B_i, L, D]` tensor per class) condition the cross-attention variant.
    """

    def __init__(self, model: AdaptedCLIP, dataset_name: str) -> None:
        super().__init__()
        self.model = model
        self.dataset_name = dataset_name

    def forward(
        self, class_names: list[str], image_contexts: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        device = self.model.device
        contexts = image_contexts or [None] * len(class_names)
        return torch.stack(
            [
                get_adapted_single_class_text_embedding(
                    self.model, self.dataset_name, name, device, image_context=context
                )
                for name, context in zip(class_names, contexts, strict=True)
            ]
        )


@dataclass(frozen=True)
class StageHooks:
    """What a variant of AA-CLIP changes in the two stage loops (train_cross_attention.py).

    trainable: sets `requires_grad` for the stage (default: the stage's adapter alone).
    save_stem: checkpoint file stem (`text_adapter`, `image_adapter`, ...).
    extra_state: extra checkpoint entries (e.g. the cross-attention weights) at save time.
    text_contexts: stage 1, `(level features, class names, unique classes) -> one image
        context per unique class` for the text path.
    image_kwargs: stage 2, `class names -> extra keyword arguments of the model's forward`.
    """

    trainable: Callable[[AdaptedCLIP], None]
    save_stem: str
    extra_state: Callable[[], dict] = dict
    text_contexts: Callable[[list[torch.Tensor], list[str], list[str]], list] | None = None
    image_kwargs: Callable[[list[str]], dict] | None = None


TEXT_STAGE = StageHooks(lambda model: trainable(model, "text_adapter"), "text_adapter")
IMAGE_STAGE = StageHooks(lambda model: trainable(model, "image_adapter"), "image_adapter")


def stage1_loss(
    level_maps: list[torch.Tensor],
    mask: torch.Tensor,
    epoch_text_feature: torch.Tensor,
    text_norm_weight: float,
    mode: str = "last_level",
) -> torch.Tensor:
    """Stage-1 loss: per-level train maps `[B, 2, S, S]`, mask `[B, 1, S, S]`, anchors `[B, D, 2]`.

    `last_level` (faithful): the original reassigns the loss per level, so only the last map
    counts; `sum_levels`: every level's segmentation loss. One orthogonal term either way.
    """
    orthogonal = text_norm_weight * orthogonal_loss(epoch_text_feature)
    if mode == "last_level":
        return calculate_seg_loss(level_maps[-1], mask) + orthogonal
    if mode == "sum_levels":
        return sum(calculate_seg_loss(level_map, mask) for level_map in level_maps) + orthogonal
    raise ConfigError(f"unknown --stage1_loss {mode!r}; use last_level or sum_levels")


def class_logits(
    features: torch.Tensor, epoch_text_feature: torch.Tensor, scale: float
) -> torch.Tensor:
    """`[B, D]` image features against their class anchors `[B, D, 2]` -> `[B, 2]` logits."""
    return scale * torch.matmul(features.unsqueeze(1), epoch_text_feature)[:, 0]


def train_text_adapter(
    model: AdaptedCLIP,
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    dist: Distributed,
    first_epoch: int = 0,
    hooks: StageHooks = TEXT_STAGE,
) -> AdaptedCLIP:
    """Stage 1: anchors per unique class (with gradient) against frozen surgery patch features."""
    device = dist.device
    hooks.trainable(model)
    anchors_module = wrap_ddp(TextAnchors(model, args.dataset), dist)
    scaler = grad_scaler(device, args.amp)
    last_level_only = args.stage1_loss == "last_level" and not args.stage1_cls_loss
    quiet = not dist.is_main
    for epoch in tqdm(range(first_epoch, args.text_epoch), desc="stage 1 epochs", disable=quiet):
        start_epoch(train_loader, epoch, args.seed)
        losses = []
        batches = tqdm(train_loader, desc=f"text epoch {epoch + 1}", leave=False, disable=quiet)
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            class_names = list(batch["class_name"])
            unique = list(dict.fromkeys(class_names))
            with autocast(device, args.amp):
                patch_features, cls = model.surgery_features(images)
                contexts = (
                    hooks.text_contexts(patch_features, class_names, unique)
                    if hooks.text_contexts is not None
                    else None
                )
                anchors = anchors_module(unique, contexts)  # [C, D, 2]
            epoch_text_feature = anchors[[unique.index(name) for name in class_names]].float()
            if last_level_only:
                # The other levels' maps would be computed and discarded (they carry no gradient).
                patch_features = patch_features[-1:]
            level_maps = [
                calculate_similarity_map(features, epoch_text_feature, args.img_size)
                for features in patch_features
            ]
            loss = stage1_loss(
                level_maps, mask, epoch_text_feature, args.text_norm_weight, args.stage1_loss
            )
            if args.stage1_cls_loss:
                logits = class_logits(cls.float(), epoch_text_feature, args.cls_logit_scale)
                loss = loss + F.cross_entropy(logits, batch["label"].to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(global_mean(loss, dist))
        logger.info("text epoch %d/%d: loss %.4f", epoch + 1, args.text_epoch, mean(losses))
        if not dist.is_main:
            continue
        save_checkpoint(
            args.save_path / f"{hooks.save_stem}.pth",
            {
                "epoch": epoch + 1,
                "text_adapter": model.text_adapter.state_dict(),
                **hooks.extra_state(),
                "text_optimizer": optimizer.state_dict(),
                "config": run_config(args),
                "rng": rng_state(),
            },
        )
    return model


def train_image_adapter(
    model: AdaptedCLIP,
    text_embeddings: dict[str, torch.Tensor],
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    args: argparse.Namespace,
    dist: Distributed,
    first_epoch: int = 0,
    hooks: StageHooks = IMAGE_STAGE,
) -> AdaptedCLIP:
    """Stage 2: CE on the detection token + focal/dice at every level, scheduler per iteration."""
    device = dist.device
    hooks.trainable(model)
    forward = wrap_ddp(model, dist)
    scaler = grad_scaler(device, args.amp)
    quiet = not dist.is_main
    for epoch in tqdm(range(first_epoch, args.image_epoch), desc="stage 2 epochs", disable=quiet):
        start_epoch(train_loader, epoch, args.seed)
        losses = []
        batches = tqdm(train_loader, desc=f"image epoch {epoch + 1}", leave=False, disable=quiet)
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            epoch_text_feature = torch.stack(
                [text_embeddings[name] for name in batch["class_name"]]
            )
            extra = hooks.image_kwargs(batch["class_name"]) if hooks.image_kwargs else {}
            with autocast(device, args.amp):
                seg_tokens, det_token = forward(images, **extra)
            logits = class_logits(det_token.float(), epoch_text_feature, args.cls_logit_scale)
            loss = F.cross_entropy(logits, label)
            for tokens in seg_tokens:
                level_map = calculate_similarity_map(tokens, epoch_text_feature, args.img_size)
                loss = loss + calculate_seg_loss(level_map, mask)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(global_mean(loss, dist))
        logger.info("image epoch %d/%d: loss %.4f", epoch + 1, args.image_epoch, mean(losses))
        if not dist.is_main:
            continue
        payload = {
            "epoch": epoch + 1,
            "image_adapter": model.image_adapter.state_dict(),
            **hooks.extra_state(),
            "image_optimizer": optimizer.state_dict(),
            "image_scheduler": scheduler.state_dict(),
            "config": run_config(args),
            "rng": rng_state(),
        }
        save_checkpoint(args.save_path / f"{hooks.save_stem}_{epoch + 1}.pth", payload)
        save_checkpoint(args.save_path / f"{hooks.save_stem}.pth", payload)
    return model


def trainable(model: AdaptedCLIP, name: str) -> None:
    """Train only `text_adapter` or `image_adapter`; CLIP and the other adapters stay frozen."""
    model.train()
    model.text_adapter.requires_grad_(name == "text_adapter")
    model.image_adapter.requires_grad_(name == "image_adapter")


def resume_stage(
    path: Path, model: AdaptedCLIP, key: str, optimizer, args, dist: Distributed, scheduler=None
) -> int:
    """Load a stage checkpoint from the save path if present; return the epoch to start from."""
    if not path.is_file():
        return 0
    payload = load_adapter(model, path, key, run_config(args))
    optimizer.load_state_dict(payload[key.replace("_adapter", "_optimizer")])
    if scheduler is not None:
        if "image_scheduler" in payload:
            scheduler.load_state_dict(payload["image_scheduler"])
        else:
            logger.warning(
                "%s has no scheduler state (original format): the LR milestones restart", path
            )
    if "rng" in payload and not dist.enabled:
        # Rank 0's saved stream would make every rank's augmentation identical; under torchrun
        # the ranks keep their own seeds and a resumed run is close to, not equal to, a fresh one.
        set_rng_state(payload["rng"])
    logger.warning("resuming %s from %s after epoch %d", key, path, payload["epoch"])
    return int(payload["epoch"])


def run(args: argparse.Namespace, dist: Distributed) -> None:
    device = dist.device
    seed_everything(args.seed)
    if dist.is_main:
        args.save_path.mkdir(parents=True, exist_ok=True)
        save_yaml(args.save_path / "config.yaml", run_config(args))
    records = training_records(args, dist)
    logger.info(
        "training AA-CLIP on %s (%d records) with %s at %d px on %s x %d, amp %s",
        args.dataset,
        len(records),
        args.model_name,
        args.img_size,
        device,
        dist.world_size,
        args.amp,
    )
    model = build_aaclip(vars(args), device)
    # Same adapter initialisation on every rank (seed above); augmentation streams differ per rank.
    torch.manual_seed(args.seed + dist.rank)

    # Stage 1: text adapters.
    text_optimizer = torch.optim.Adam(
        model.text_adapter.parameters(), lr=args.text_lr, betas=tuple(args.betas)
    )
    text_path = args.save_path / "text_adapter.pth"
    text_start = resume_stage(text_path, model, "text_adapter", text_optimizer, args, dist)
    if args.text_epoch == 0 and not text_path.is_file():
        logger.info("--text_epoch 0: no stage 1, anchors from plain CLIP")
        model.use_text_adapter = False
    elif text_start < args.text_epoch:
        loader = aaclip_loader(records, args, text=True, dist=dist)
        train_text_adapter(model, loader, text_optimizer, args, dist, text_start)
        del loader
    del text_optimizer

    # Between stages: anchors computed once, frozen for stage 2.
    model.eval()
    with torch.no_grad():
        text_embeddings = get_adapted_text_embedding(model, args.dataset, device)

    # Stage 2: image adapters.
    image_optimizer = torch.optim.Adam(
        model.image_adapter.parameters(), lr=args.image_lr, betas=tuple(args.betas)
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        image_optimizer, milestones=args.image_milestones, gamma=args.image_gamma
    )
    image_start = resume_stage(
        args.save_path / "image_adapter.pth",
        model,
        "image_adapter",
        image_optimizer,
        args,
        dist,
        scheduler,
    )
    if image_start < args.image_epoch:
        loader = aaclip_loader(records, args, text=False, dist=dist)
        train_image_adapter(
            model, text_embeddings, loader, image_optimizer, scheduler, args, dist, image_start
        )
    logger.info("checkpoints in %s", args.save_path)


def model_choice(argv: list[str] | None) -> str:
    """The `--model` of a command line, else the `model` key of its `--config`, else aaclip."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=None)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    model = known.model
    if model is None and known.config is not None:
        model = load_yaml(known.config).get("model")
    model = model or "aaclip"
    if model != "aaclip" and model not in TRAINERS:
        choices = ", ".join(["aaclip", *TRAINERS])
        raise ConfigError(f"unknown --model {model!r}; choose one of {choices}")
    return model


def main(argv: list[str] | None = None) -> int:
    try:
        model = model_choice(argv)
    except UserError as error:
        setup_logging()
        logger.error("%s", error)
        return 2
    if model != "aaclip":
        return importlib.import_module(TRAINERS[model]).main(argv)
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
