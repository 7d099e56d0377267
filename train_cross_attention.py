"""Fine-tune AA-CLIP + cross-attention from a trained AA-CLIP (the user's fork; spec
cross_attention.md, the user's guide seeds/001).

    python train.py --save_path ckpt/baseline
    python train_cross_attention.py --save_path ckpt/cross_attn \\
        --load_base_text_adapter ckpt/baseline/text_adapter.pth \\
        --load_base_image_adapter ckpt/baseline/image_adapter.pth
    python test.py --save_path ckpt/cross_attn

A fair comparison (seed 001): every AA-CLIP setting not given on the command line is inherited from
the base checkpoint's config (backbone, adapters, data set, shot, seed, epochs, learning rates,
batch sizes, `stage1_loss`), so base and fine-tuned runs differ only by the new modules. The fork
also switched the stage-1 loss to `sum_levels` while adding the modules; pass `--stage1_loss
sum_levels` to reproduce it. Base adapters load strictly (the fork fell back to random adapters
silently) and their Adam moments carry over (`--no-carry_base_optimizer`: fresh, as the fork);
the new modules start with fresh optimizer state.

Stage 1 trains the text adapters and `text_cross_attn` (image context: the batch's first-level
stage-1 surgery features); stage 2 trains the image adapters and `image_cross_attn` (text context:
each image's class prompts after text block 0 and adapter 0). Checkpoints keep the fork's names,
`text_adapter_cross_attn.pth` and `image_adapter_cross_attn[_<epoch>].pth`, plus config, scheduler
and RNG states; re-running with the same save path resumes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import train
from datasets.catalog import real_name
from models.aaclip import load_adapter
from models.cross_attention import (
    MODEL_NAME,
    AdaptedCLIPWithCrossAttention,
    build_cross_attention,
    load_cross_attention_stage,
)
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import (
    CONFIG_DIR,
    load_yaml,
    parse_with_config,
    resolve_backbone_defaults,
    save_yaml,
)
from utils.errors import CheckpointError
from utils.forward_utils import get_adapted_text_embedding
from utils.runtime import Distributed, rng_state, seed_everything, set_rng_state
from utils.training import check_shot, run_config, run_main, training_records

logger = logging.getLogger("train")

# Settings never taken from the base run: where this run writes, how it runs, and its own modules.
NOT_INHERITED = {
    "model",
    "config",
    "save_path",
    "device",
    "log_level",
    "num_workers",
    "load_base_text_adapter",
    "load_base_image_adapter",
    "carry_base_optimizer",
}
DATA_LOCATION = ("data_root", "metadata_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = train.build_parser(MODEL_NAME, __doc__.split("\n")[0])
    parser.set_defaults(save_path=Path("ckpt/cross_attention"))
    group = parser.add_argument_group("cross-attention")
    group.add_argument("--load_base_text_adapter", type=Path, default=None)
    group.add_argument("--load_base_image_adapter", type=Path, default=None)
    group.add_argument(
        "--carry_base_optimizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the adapters from the base run's Adam moments (seed 001); the fork reset them",
    )
    group.add_argument("--cross_attn_heads", type=int, default=8)
    group.add_argument("--cross_attn_weight_text", type=float, default=0.1)
    group.add_argument("--cross_attn_weight_image", type=float, default=0.1)
    group.add_argument(
        "--cross_attn_norm_match",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rescale each branch output to its token's norm (the fork's fix)",
    )
    group.add_argument(
        "--cross_attn_init",
        default="gated",
        choices=("gated", "xavier"),
        help="gated: a learnable gate at 0 keeps step 0 equal to the base; xavier: the fork",
    )
    group.add_argument(
        "--text_context_normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="L2-normalise the text-context tokens (the fork's fix)",
    )
    group.add_argument(
        "--text_context_key_mask",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="mask text-context positions after end-of-text (the fork attends to padding)",
    )
    group.add_argument(
        "--image_context_pairing",
        default="batch_mean",
        choices=("batch_mean", "per_class_mean"),
        help="batch_mean: the fork (all images averaged, or prompt n paired with image n when "
        "the counts match); per_class_mean: each class's anchors see its own images' mean",
    )
    group.add_argument(
        "--cross_attn_at_test",
        default="image",
        choices=("image", "none", "both"),
        help="image: use the image cross-attention at test; none: the fork (modules unused); "
        "both: also per-image text anchors",
    )
    return parser


def explicit_settings(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Settings given on the command line or in a `--config` file named there."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    keys = set(given)
    if "config" in given:
        keys |= set(load_yaml(given["config"]))
    return keys


def base_config(args: argparse.Namespace) -> tuple[dict, Path | None]:
    """The stored config of the base checkpoints (image first), or ({}, None) for the original
    code's files, which carry none."""
    for path in (args.load_base_image_adapter, args.load_base_text_adapter):
        if path is not None:
            config = load_checkpoint(path).get("config")
            if config:
                return config, path
    return {}, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_config(parser, argv, CONFIG_DIR / "cross_attention.yaml")
    explicit = explicit_settings(build_parser(), argv)
    inherited, source = base_config(args)
    skip = NOT_INHERITED | explicit
    if "dataset" in explicit and inherited.get("dataset") != args.dataset:
        skip |= set(DATA_LOCATION)
    valid = set(vars(args))
    taken = {key: value for key, value in inherited.items() if key in valid and key not in skip}
    for key, value in taken.items():
        setattr(args, key, Path(value) if key in DATA_LOCATION and value else value)
    args.inherited_from = str(source) if source else None
    resolve_backbone_defaults(args)
    check_shot(args)
    return args


def weight_check(model: AdaptedCLIPWithCrossAttention, bases: dict[str, dict]) -> None:
    """Seed 001 step 5, done right (spec §9.3): log each module's mean |weight| and the base
    checkpoints' epochs. Magnitudes cannot tell a trained adapter from a fresh one (Xavier gives
    ~0.03 for 768 x 768 and stage 1 moves weights by < 0.01); the epoch against the base run's
    own total can, so an unfinished base is a warning."""
    modules = {
        "text_adapter": model.text_adapter,
        "image_adapter": model.image_adapter,
        "text_cross_attn": model.text_cross_attn,
        "image_cross_attn": model.image_cross_attn,
    }
    for name, module in modules.items():
        weights = [p for p in module.parameters() if p.dim() > 1]
        magnitude = sum(p.abs().mean().item() for p in weights) / len(weights)
        logger.info("weight check: %s mean |w| %.6f", name, magnitude)
    for key, payload in bases.items():
        total_key = "text_epoch" if key == "text_adapter" else "image_epoch"
        total = (payload.get("config") or {}).get(total_key)
        epoch = payload.get("epoch")
        logger.info("weight check: base %s after epoch %s of %s", key, epoch, total or "?")
        if total is not None and epoch is not None and epoch < total:
            logger.warning("the base %s is unfinished (epoch %s of %s)", key, epoch, total)


def carry_optimizer_state(
    optimizer: torch.optim.Optimizer, base_state: dict, count: int, path: Path
) -> None:
    """Give the optimizer's first `count` parameters (the adapters, in the base's order) the base
    run's Adam moments; the cross-attention parameters keep a fresh state."""
    base_ids = base_state["param_groups"][0]["params"]
    if len(base_ids) != count:
        msg = f"{path} optimizer holds {len(base_ids)} parameters, the adapters {count}"
        raise CheckpointError(f"{msg}; pass --no-carry_base_optimizer")
    state = optimizer.state_dict()
    state["state"] = {
        new_id: base_state["state"][old_id]
        for new_id, old_id in enumerate(base_ids)
        if old_id in base_state["state"]
    }
    optimizer.load_state_dict(state)


def stage_optimizer(
    model: AdaptedCLIPWithCrossAttention, stage: str, lr: float, betas: list[float]
) -> torch.optim.Adam:
    """One Adam over a stage's adapter (first group, the base's order) and its cross-attention
    module + gate (second group)."""
    adapter = model.text_adapter if stage == "text" else model.image_adapter
    module = model.text_cross_attn if stage == "text" else model.image_cross_attn
    gate = model.text_cross_attn_gate if stage == "text" else model.image_cross_attn_gate
    cross = list(module.parameters()) + ([gate] if gate is not None else [])
    groups = [{"params": list(adapter.parameters())}, {"params": cross}]
    return torch.optim.Adam(groups, lr=lr, betas=tuple(betas))


def set_trainable(model: AdaptedCLIPWithCrossAttention, stage: str) -> None:
    """Train a stage's adapter, cross-attention module and gate; everything else frozen."""
    train.trainable(model, f"{stage}_adapter")
    for name in ("text", "image"):
        getattr(model, f"{name}_cross_attn").requires_grad_(name == stage)
        gate = getattr(model, f"{name}_cross_attn_gate")
        if gate is not None:
            gate.requires_grad_(name == stage)


def stage_hooks(
    model: AdaptedCLIPWithCrossAttention, args: argparse.Namespace
) -> tuple[train.StageHooks, train.StageHooks]:
    """How the cross-attention changes train.py's two loops."""

    def text_contexts(
        level_features: list[torch.Tensor], class_names: list[str], unique: list[str]
    ) -> list[torch.Tensor]:
        context = level_features[0]  # [B, g², D]: the first level's stage-1 features (§4.1)
        if args.image_context_pairing == "batch_mean":
            return [context] * len(unique)
        return [
            context[[i for i, name in enumerate(class_names) if name == wanted]].mean(
                dim=0, keepdim=True
            )
            for wanted in unique
        ]

    def image_kwargs(class_names: list[str]) -> dict:
        names = [real_name(args.dataset, name) for name in class_names]
        context, mask = model.text_contexts(names)
        return {"text_context": context, "text_key_mask": mask}

    text = train.StageHooks(
        lambda m: set_trainable(m, "text"),
        "text_adapter_cross_attn",
        lambda: model.cross_attention_state("text"),
        text_contexts=text_contexts,
    )
    image = train.StageHooks(
        lambda m: set_trainable(m, "image"),
        "image_adapter_cross_attn",
        lambda: model.cross_attention_state("image"),
        image_kwargs=image_kwargs,
    )
    return text, image


def load_bases(model: AdaptedCLIPWithCrossAttention, args: argparse.Namespace) -> dict[str, dict]:
    """Load the base adapters (strict; our checkpoints or the original code's)."""
    bases = {}
    base_view = {**run_config(args), "model": "aaclip"}
    for key, path in (
        ("text_adapter", args.load_base_text_adapter),
        ("image_adapter", args.load_base_image_adapter),
    ):
        if path is not None:
            bases[key] = load_adapter(model, path, key, base_view)
            logger.info("base %s loaded from %s", key, path)
    if not bases:
        logger.warning(
            "no --load_base_* checkpoints: the adapters start from scratch, so a comparison "
            "with a base model is not fair (seed 001)"
        )
    return bases


def resume(
    model: AdaptedCLIPWithCrossAttention,
    stage: str,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    dist: Distributed,
    scheduler=None,
) -> int:
    """Resume a stage from this run's own checkpoint (overrides the base); the next epoch."""
    path = args.save_path / f"{stage}_adapter_cross_attn.pth"
    if not path.is_file():
        return 0
    payload = load_cross_attention_stage(model, path, stage, run_config(args))
    optimizer.load_state_dict(payload[f"{stage}_optimizer"])
    if scheduler is not None and "image_scheduler" in payload:
        scheduler.load_state_dict(payload["image_scheduler"])
    if "rng" in payload and not dist.enabled:
        set_rng_state(payload["rng"])
    logger.warning("resuming %s stage from %s after epoch %d", stage, path, payload["epoch"])
    return int(payload["epoch"])


def run(args: argparse.Namespace, dist: Distributed) -> None:
    device = dist.device
    seed_everything(args.seed)
    if dist.is_main:
        args.save_path.mkdir(parents=True, exist_ok=True)
        save_yaml(args.save_path / "config.yaml", run_config(args))
    if args.inherited_from:
        logger.info("settings not given on the command line come from %s", args.inherited_from)
    records = training_records(args, dist)
    logger.info(
        "fine-tuning AA-CLIP + cross-attention on %s (%d records), %s at %d px, stage-1 loss %s,"
        " init %s",
        args.dataset,
        len(records),
        args.model_name,
        args.img_size,
        args.stage1_loss,
        args.cross_attn_init,
    )
    model = build_cross_attention(run_config(args), device)
    torch.manual_seed(args.seed + dist.rank)
    bases = load_bases(model, args)
    weight_check(model, bases)
    text_hooks, image_hooks = stage_hooks(model, args)

    # Stage 1: text adapters + text cross-attention.
    optimizer = stage_optimizer(model, "text", args.text_lr, args.betas)
    if args.carry_base_optimizer and "text_adapter" in bases:
        carry_optimizer_state(
            optimizer,
            bases["text_adapter"]["text_optimizer"],
            len(list(model.text_adapter.parameters())),
            args.load_base_text_adapter,
        )
    start = resume(model, "text", optimizer, args, dist)
    if start < args.text_epoch:
        loader = train.aaclip_loader(records, args, text=True, dist=dist)
        train.train_text_adapter(model, loader, optimizer, args, dist, start, text_hooks)
        del loader
    elif start == 0 and dist.is_main:
        # --text_epoch 0: keep the (base) text adapter beside the image checkpoints.
        save_checkpoint(
            args.save_path / "text_adapter_cross_attn.pth",
            {
                "epoch": 0,
                "text_adapter": model.text_adapter.state_dict(),
                **model.cross_attention_state("text"),
                "text_optimizer": optimizer.state_dict(),
                "config": run_config(args),
                "rng": rng_state(),
            },
        )
    del optimizer

    # Between stages: anchors without image context (§4.3); text contexts from the new adapter.
    model.eval()
    model.class_text_contexts.clear()
    with torch.no_grad():
        text_embeddings = get_adapted_text_embedding(model, args.dataset, device)

    # Stage 2: image adapters + image cross-attention.
    optimizer = stage_optimizer(model, "image", args.image_lr, args.betas)
    if args.carry_base_optimizer and "image_adapter" in bases:
        carry_optimizer_state(
            optimizer,
            bases["image_adapter"]["image_optimizer"],
            len(list(model.image_adapter.parameters())),
            args.load_base_image_adapter,
        )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=args.image_milestones, gamma=args.image_gamma
    )
    start = resume(model, "image", optimizer, args, dist, scheduler)
    if start < args.image_epoch:
        loader = train.aaclip_loader(records, args, text=False, dist=dist)
        train.train_image_adapter(
            model, text_embeddings, loader, optimizer, scheduler, args, dist, start, image_hooks
        )
    logger.info("checkpoints in %s", args.save_path)


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, log_name="train_cross_attention.log")


if __name__ == "__main__":
    raise SystemExit(main())
