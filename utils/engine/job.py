"""A training command, for every model and every training script (train.py, train_feclip.py,
train_sowa.py, train_cross_attention.py): its flags, generated from the model's config dataclass
and `RunConfig`; the settings a fine-tuning run inherits from its base checkpoints; and the run,
`for stage in model.stages()` through the one loop (`utils.engine.training.train_stage`).

`--config configs/<model>.yaml` sets defaults, flags win. A config class that names base
checkpoints (`base_checkpoints`, the cross-attention variant's `--load_base_*`) takes every
setting of its `inherits` class and of the run that is not given on the command line (or in
`--config`) from the stored config of the first base file that has one, so base and fine-tuned
runs differ only by what was asked (seed 001's fair comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from models.backbone import check_weights
from models.base import ClipConfig, FrozenCLIPModel
from models.registry import MODELS, model_class
from utils.core.checkpoint import load_checkpoint
from utils.core.config import (
    ARCH,
    TEST,
    TRAIN,
    HelpFormatter,
    add_settings,
    from_mapping,
    from_namespace,
    load_yaml,
    parse_with_config,
    parser_defaults,
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
# Never taken from a base run: where this run writes and how this process runs.
NOT_INHERITED = {
    "config",
    "save_path",
    "device",
    "log_level",
    "num_workers",
    "trust_checkpoint",
    "progress",
}
DATA_LOCATION = {"data_root", "metadata_dir"}


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """A parsed training command."""

    model_class: type[FrozenCLIPModel]
    config: ClipConfig
    run: RunConfig
    inherited_from: str | None = None  # the base checkpoint settings came from

    @property
    def log_file(self) -> str:
        return self.model_class.log_file


def build_parser(model: type[FrozenCLIPModel]) -> argparse.ArgumentParser:
    """The flags of a model's config and of the run, with the model's run defaults."""
    config_class = model.config_class
    parser = argparse.ArgumentParser(
        description=f"Train {config_class.name} (settings: {config_class.__name__}); "
        "--model NAME --help lists another model's settings.",
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


def explicit_settings(model: type[FrozenCLIPModel], argv: list[str] | None) -> set[str]:
    """Settings given on the command line or in a `--config` file named there."""
    parser = build_parser(model)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    keys = set(given)
    if "config" in given:
        keys |= set(parser_defaults(parser, load_yaml(given["config"])))
    return keys


def inherit_base_settings(
    model: type[FrozenCLIPModel], args: argparse.Namespace, argv: list[str] | None
) -> str | None:
    """Fill the settings not given from the stored config of the model's base checkpoints (the
    first that has one; files of the original code carry none); returns that file, or None."""
    config_class = model.config_class
    inherited, source = {}, None
    for key in config_class.base_checkpoints:
        path = getattr(args, key)
        if path is not None:
            inherited = load_checkpoint(path, trust=args.trust_checkpoint).get("config") or {}
            if inherited:
                source = path
                break
    if not inherited:
        return None
    explicit = explicit_settings(model, argv)
    skip = NOT_INHERITED | explicit
    if "dataset" in explicit and inherited.get("dataset") != args.dataset:
        skip |= DATA_LOCATION  # another data set: its own location
    for settings_class in (RunConfig, config_class.inherits):
        base = from_mapping(settings_class, inherited)
        for field in dataclasses.fields(settings_class):
            names = {field.name, *field.metadata["aliases"]}
            if names & set(inherited) and field.name not in skip:
                setattr(args, field.name, getattr(base, field.name))
    return str(source)


def parse_args(argv: list[str] | None = None, model: str = "aaclip") -> TrainingJob:
    """A training command line of `model` -> its checked job."""
    model_type = model_class(model)
    parser = build_parser(model_type)
    args = parse_with_config(parser, argv, (RunConfig, model_type.config_class), model=model)
    inherited_from = None
    if model_type.config_class.base_checkpoints:
        inherited_from = inherit_base_settings(model_type, args, argv)
    if args.training_mode == "full_shot" and args.shot:
        explicit = explicit_settings(model_type, argv)
        if "shot" in explicit and "training_mode" not in explicit:
            # a shot given to a model whose default mode is full shot asks for few-shot
            args.training_mode = "few_shot"
            logger.info(
                "--shot %d: few-shot training (%s's default is full shot; --training_mode "
                "full_shot with --shot 0 trains on the whole test split)",
                args.shot,
                model,
            )
    return job_from_args(model_type, args, inherited_from)


def run(job: TrainingJob, dist: Distributed) -> None:
    """Seed, read the records, build the model, train its stages in order."""
    settings = dataclasses.replace(job.run, amp=resolve_amp(job.run.amp, dist.device))
    seed_everything(settings.seed)
    if job.inherited_from:
        logger.info("settings not given on the command line come from %s", job.inherited_from)
    if Path(settings.data_root).is_dir():  # (a missing one is the records' one-line error)
        check_weights(job.config.model_name, job.config.pretrained)  # before records are written
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
    model.prepare_training(trust=settings.trust_checkpoint)
    stages = model.stages()
    for number, stage in enumerate(stages, start=1):
        logger.info("stage %d of %d: %s", number, len(stages), stage.title or stage.name)
        train_stage(model, stage, records, settings, dist)
    logger.info("checkpoints in %s", settings.save_path)


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


def main(argv: list[str] | None = None, model: str | None = None) -> int:
    """A training script's `main`: `model`, or (train.py) the one `--model` / `--config` name;
    parse, join torchrun, log, run; 2 on a user error."""
    if model is None:
        setup_logging()
        choice: list[str] = []
        if run_script(lambda: choice.append(model_choice(argv)), logger):
            return 2
        model = choice[0]
    return run_main(lambda args: parse_args(args, model), run, argv)
