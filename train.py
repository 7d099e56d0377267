"""Train a model: AA-CLIP's two stages (text adapters, then image adapters) by default, or any
registered model with `--model` (feclip, sowa; aaclip_cross_attn hands over to
train_cross_attention.py).

    python train.py                                  # AA-CLIP, tiny backbone, synthetic set
    python train.py --dataset VisA --shot 32         # ViT-L-14-336 + openai weights, 518 px
    python train.py --model feclip --dataset MVTec --shot 0

Every setting is a field of the model's config dataclass (models/<model>.py) or of
`utils.engine.training.RunConfig`; `--config configs/<model>.yaml` sets defaults, flags win. The
model defines its stages, optimizers and losses; AA-CLIP runs two (`train_text_adapter`, then
`train_image_adapter`), FE-CLIP and SOWA one, each through `utils.engine.training.train_stage`,
resuming from the save path while epoch < total (optimizer, scheduler and RNG states restored).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from models.aaclip import AdaptedCLIP
from models.base import ClipConfig, FrozenCLIPModel
from models.registry import MODELS, model_class
from utils.core.config import (
    ARCH,
    TEST,
    TRAIN,
    HelpFormatter,
    add_settings,
    from_namespace,
    keys_of,
    load_yaml,
    parse_with_config,
    validate,
)
from utils.core.errors import ConfigError
from utils.core.runtime import resolve_amp, run_script, seed_everything, setup_logging
from utils.engine.distributed import Distributed
from utils.engine.training import RunConfig, run_main, train_stage, training_records

logger = logging.getLogger("train")

GROUPS = (
    (ARCH, "architecture (stored in every checkpoint; a checkpoint loads only into the same)"),
    (TEST, "test time (test.py may override these)"),
    (TRAIN, "training recipe"),
)


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """A parsed training command."""

    model_class: type[FrozenCLIPModel]
    config: ClipConfig
    run: RunConfig
    inherited_from: str | None = None  # the base checkpoint settings came from (cross-attention)

    @property
    def log_file(self) -> str:
        return self.model_class.log_file


def build_parser(model: type[FrozenCLIPModel]) -> argparse.ArgumentParser:
    """The flags of a model's config and of the run, with the model's run defaults."""
    config_class = model.config_class
    parser = argparse.ArgumentParser(
        description=f"Train {config_class.name} (settings: {config_class.__name__}).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model", default=config_class.name, choices=tuple(MODELS), help="the model to train"
    )
    add_settings(parser.add_argument_group("run"), RunConfig, defaults=config_class.run_defaults)
    for kind, title in GROUPS:
        add_settings(parser.add_argument_group(title), config_class, (kind,))
    return parser


def job_from_args(
    model: type[FrozenCLIPModel], args: argparse.Namespace, inherited_from: str | None = None
) -> TrainingJob:
    """Checked settings from parsed flags: backbone defaults resolved for the data set."""
    name = model.config_class.name
    if args.model != name:
        raise ConfigError(f"this script trains {name}; use train.py --model {args.model}")
    run = from_namespace(RunConfig, args).resolve()
    config = from_namespace(model.config_class, args).resolve(run.dataset)
    validate(config)
    config.check()
    return TrainingJob(model, config, run, inherited_from)


def parse_args(argv: list[str] | None = None, model: str = "aaclip") -> TrainingJob:
    model_type = model_class(model)
    parser = build_parser(model_type)
    known = keys_of(RunConfig, model_type.config_class)
    args = parse_with_config(parser, argv, known, model=model)
    return job_from_args(model_type, args)


def run(
    job: TrainingJob,
    dist: Distributed,
    setup: Callable[[FrozenCLIPModel, RunConfig], Callable | None] | None = None,
) -> None:
    """Seed, read the records, build the model, train its stages. `setup(model, run)` runs
    after the model is built and may return `train_stage`'s `before_resume` hook."""
    settings = dataclasses.replace(job.run, amp=resolve_amp(job.run.amp, dist.device))
    seed_everything(settings.seed)
    if job.inherited_from:
        logger.info("settings not given on the command line come from %s", job.inherited_from)
    records = training_records(settings, dist)
    logger.info(
        "training %s on %s (%d records) with %s at %d px on %s x %d, amp %s",
        job.config.name,
        settings.dataset,
        len(records),
        job.config.model_name,
        job.config.img_size,
        dist.device,
        dist.world_size,
        settings.amp,
    )
    model = job.model_class.from_config(job.config, dist.device)
    # Same initialisation on every rank (seed above); augmentation streams differ per rank.
    torch.manual_seed(settings.seed + dist.rank)
    before_resume = setup(model, settings) if setup is not None else None
    if isinstance(model, AdaptedCLIP):  # and its cross-attention variant: two stages
        train_text_adapter(model, records, settings, dist, before_resume)
        train_image_adapter(model, records, settings, dist, before_resume)
    else:
        (stage,) = model.stages()
        train_stage(model, stage, records, settings, dist, before_resume)
    logger.info("checkpoints in %s", settings.save_path)


def train_text_adapter(
    model: AdaptedCLIP,
    records: list[dict],
    settings: RunConfig,
    dist: Distributed,
    before_resume: Callable | None = None,
) -> None:
    """AA-CLIP stage 1 (spec aaclip.md §11.1): the text adapters (and the variant's text
    cross-attention) against frozen surgery patch features; `text_adapter.pth`."""
    train_stage(model, model.stages()[0], records, settings, dist, before_resume)


def train_image_adapter(
    model: AdaptedCLIP,
    records: list[dict],
    settings: RunConfig,
    dist: Distributed,
    before_resume: Callable | None = None,
) -> None:
    """AA-CLIP stage 2 (spec §11.3): the image adapters and projections (and the variant's image
    cross-attention) against the stage-1 anchors, frozen; `image_adapter[_<epoch>].pth`."""
    train_stage(model, model.stages()[1], records, settings, dist, before_resume)


def train_model(model: str, argv: list[str] | None) -> int:
    """`main` of a model's training: parse, join torchrun, log, run; 2 on a user error."""
    return run_main(lambda args: parse_args(args, model), run, argv)


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
    model_class(model)
    return model


def main(argv: list[str] | None = None) -> int:
    choice: list[str] = []
    setup_logging()
    if run_script(lambda: choice.append(model_choice(argv)), logger):
        return 2
    model = choice[0]
    if model == "aaclip_cross_attn":
        return importlib.import_module("train_cross_attention").main(argv)
    return train_model(model, argv)


if __name__ == "__main__":
    raise SystemExit(main())
