"""Evaluate trained checkpoints on a labelled data set, per class then the macro mean.

    python test.py --save_path ckpt/x --dataset MVTec            # image_adapter.pth
    python test.py --save_path ckpt/x --dataset MVTec --all_epochs
    python test.py --checkpoint ckpt/x/image_adapter_15.pth --dataset BTAD --metrics official

    python test.py --backend openvino --checkpoint deploy/x --dataset MVTec   # an export

    python test.py --save_path ckpt/x --dataset MVTecAD2 --tile 336       # SegF1, AUPRO@0.05, ...
    python test.py --save_path ckpt/x --dataset MVTecAD2 --tile 336 --split test_private \
        --submission sub/                        # then --split test_private_mixed into sub/ too

Every flag is a setting of `utils.evaluation.evaluate.EvalConfig` or a model's test-time or
architectural setting (default: the checkpoint's); the loop is `utils.evaluation.evaluate`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from datasets.synthetic import check_generatable
from models.registry import MODELS, config_classes
from utils.core.checkpoint import check_writable
from utils.core.config import (
    ARCH,
    TRAIN,
    HelpFormatter,
    add_overrides,
    add_settings,
    keys_of,
    parse_config,
    setting_names,
)
from utils.core.errors import ConfigError
from utils.core.runtime import run_script, setup_logging
from utils.engine.training import RunConfig
from utils.evaluation.evaluate import EvalConfig, evaluate
from utils.evaluation.report import format_table
from utils.inference.source import flag_models

logger = logging.getLogger("test")


def build_parser(models: list[str] | None = None) -> argparse.ArgumentParser:
    """test.py's flags: the evaluation's, and the test-time and architectural ones of `models`
    (the model the checkpoint holds, when known; default every model's)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    add_settings(parser, EvalConfig)
    add_overrides(
        parser.add_argument_group(
            "model settings: default the checkpoint's; test-time ones override it, "
            "architectural ones must equal it (or describe a file of the original code, which "
            "stores none)"
        ),
        [MODELS[name].config_class for name in models or MODELS],
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[EvalConfig, dict]:
    """(checked evaluation settings, the model settings given)."""
    # A training YAML's recipe and architecture describe its run: the checkpoint holds them.
    training_only = (keys_of(RunConfig) - keys_of(EvalConfig)) | setting_names(
        config_classes(), (ARCH, TRAIN)
    )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--save_path", type=Path, default=EvalConfig.save_path)
    models = flag_models(argv, default=pre.parse_known_args(argv)[0].save_path)
    classes = [MODELS[name].config_class for name in models]
    return parse_config(
        build_parser(models),
        argv,
        EvalConfig,
        classes,
        training_only,
        also_known=(RunConfig, *config_classes()),
    )


def check_source(config: EvalConfig) -> None:
    """What is evaluated exists, before its folder receives results and test.log (a missing
    one is never created)."""
    if config.checkpoint is not None:
        source, flag = config.checkpoint, "--checkpoint"
    elif config.graph:
        raise ConfigError(
            f"--backend {config.backend} evaluates an export: pass its folder with --checkpoint"
        )
    else:
        source, flag = config.save_path, "--save_path"
    if source is not None and not Path(source).exists():
        raise ConfigError(
            f"{flag} {source} does not exist; train first, or pass the run folder or file that "
            "holds the model"
        )


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def body() -> None:
        config, overrides = parse_args(argv)
        if config.results_dir is None:  # results go beside the model: it must be there
            check_source(config)
        if config.dataset == "Synthetic":  # generated on first use: a writable data root
            check_generatable(config.root())
        out_dir = config.output_folder()
        check_writable(out_dir, "--results_dir")  # before any work, not after an hour
        setup_logging(out_dir / "test.log", config.log_level)
        config = config.resolve()
        results = evaluate(config, overrides)
        for result in results if config.columns else []:  # unlabelled: the maps are the output
            print(f"\n{config.dataset} | {result.path.name} (epoch {result.epoch})\n")
            table = format_table(
                result.per_class,
                config.columns,
                undefined=config.undefined_metric,
                decimals=config.decimals,
            )
            print(table)

    return run_script(body, logger)


if __name__ == "__main__":
    raise SystemExit(main())
