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

The model (models/cross_attention.py) trains the same two stages as AA-CLIP: stage 1 the text
adapters and `text_cross_attn`, stage 2 the image adapters and `image_cross_attn`. Checkpoints keep
the fork's names, `text_adapter_cross_attn.pth` and `image_adapter_cross_attn[_<epoch>].pth`;
re-running with the same save path resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch

import train
from models.aaclip import AAClipConfig
from models.base import Stage
from models.cross_attention import (
    AdaptedCLIPWithCrossAttention,
    CrossAttentionConfig,
    carry_optimizer_state,
    log_weight_check,
)
from utils.core.checkpoint import load_checkpoint
from utils.core.config import from_mapping, keys_of, load_yaml, parse_with_config, parser_defaults
from utils.engine.training import RunConfig, run_main

logger = logging.getLogger("train")

# Settings never taken from the base run: where this run writes and how it runs.
NOT_INHERITED = {"config", "save_path", "device", "log_level", "num_workers"}
DATA_LOCATION = {"data_root", "metadata_dir"}


def explicit_settings(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Settings given on the command line or in a `--config` file named there."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    keys = set(given)
    if "config" in given:
        keys |= set(parser_defaults(parser, load_yaml(given["config"])))
    return keys


def base_config(args: argparse.Namespace) -> tuple[dict, Path | None]:
    """The stored config of the base checkpoints (image first), or ({}, None) for the original
    code's files, which carry none."""
    for path in (args.load_base_image_adapter, args.load_base_text_adapter):
        if path is not None:
            config = load_checkpoint(path, trust=args.trust_checkpoint).get("config")
            if config:
                return config, path
    return {}, None


def parse_args(argv: list[str] | None = None) -> train.TrainingJob:
    model = AdaptedCLIPWithCrossAttention
    parser = train.build_parser(model)
    known = keys_of(RunConfig, CrossAttentionConfig)
    args = parse_with_config(parser, argv, known, model=CrossAttentionConfig.name)
    explicit = explicit_settings(train.build_parser(model), argv)
    inherited, source = base_config(args)
    skip = NOT_INHERITED | explicit
    if "dataset" in explicit and inherited.get("dataset") != args.dataset:
        skip |= DATA_LOCATION
    for config_class in (RunConfig, AAClipConfig):
        base = from_mapping(config_class, inherited)
        for field in dataclasses.fields(config_class):
            names = {field.name, *field.metadata["aliases"]}
            if names & set(inherited) and field.name not in skip:
                setattr(args, field.name, getattr(base, field.name))
    return train.job_from_args(model, args, str(source) if source else None)


def load_bases(
    model: AdaptedCLIPWithCrossAttention, run: RunConfig
) -> Callable[[Stage, torch.optim.Optimizer], None]:
    """Load the base adapters (strict; ours or the original code's), log the weight check, and
    return the hook that gives each stage's adapter the base run's Adam moments."""
    config = model.config
    paths = {
        "text_adapter": config.load_base_text_adapter,
        "image_adapter": config.load_base_image_adapter,
    }
    bases = {
        key: model.load_base(key, path, run.trust_checkpoint)
        for key, path in paths.items()
        if path is not None
    }
    if not bases:
        logger.warning(
            "no --load_base_* checkpoints: the adapters start from scratch, so a comparison "
            "with a base model is not fair (seed 001)"
        )
    log_weight_check(model, bases)

    def carry(stage: Stage, optimizer: torch.optim.Optimizer) -> None:
        key = f"{stage.name}_adapter"
        if config.carry_base_optimizer and key in bases:
            adapter = getattr(model, key)
            state = bases[key][f"{stage.name}_optimizer"]
            carry_optimizer_state(optimizer, state, len(list(adapter.parameters())), paths[key])

    return carry


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, lambda job, dist: train.run(job, dist, load_bases), argv)


if __name__ == "__main__":
    raise SystemExit(main())
