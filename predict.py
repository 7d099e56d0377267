"""Field deployment: calibrate thresholds on normal images, score folders of new images, export.

    python predict.py calibrate --checkpoint ckpt/x --normal_dir field/normal --percentile 99.5
    python predict.py score --checkpoint ckpt/x --input field/incoming --out runs/incoming
    python predict.py score --checkpoint ckpt/x --input field/incoming --out runs/incoming \
        --labels labels.csv
    python predict.py export --checkpoint ckpt/x --format onnx --out deploy/x
    python predict.py export --checkpoint ckpt/x --format openvino --precision int8 \
        --calibration_dir field/normal --out deploy/x_int8
    python predict.py score --backend onnxruntime --checkpoint deploy/x --input field/incoming \
        --out runs/incoming

The model's own preprocessing is the default (`--preprocess letterbox --pad_color R G B`, or
any test-time model setting, override it; calibrate records them, score and export reuse them).
The work is in utils/deploy/ (calibrate.py, score.py, package.py); every flag is a setting of
their config dataclasses, and `--help` lists the model settings of the model `--checkpoint`
holds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging

from models.registry import MODELS
from utils.core.checkpoint import check_writable, folder_lock
from utils.core.config import (
    HelpFormatter,
    add_overrides,
    add_settings,
    parse_config,
)
from utils.core.runtime import run_script, setup_logging
from utils.deploy.calibrate import CalibrateConfig, calibrate
from utils.deploy.field import FieldConfig
from utils.deploy.package import ExportConfig, export
from utils.deploy.score import ScoreConfig, score
from utils.inference.source import flag_models

logger = logging.getLogger("predict")

SCORE_LOCK = "score.lock"  # held in --out while a score writes there

COMMANDS = {
    "calibrate": (CalibrateConfig, calibrate),
    "score": (ScoreConfig, score),
    "export": (ExportConfig, export),
}


def build_parser(command: str, models: list[str] | None = None) -> argparse.ArgumentParser:
    """One command's flags: its config's, and the test-time and architectural ones of
    `models` (the model the checkpoint holds, when known; default every model's)."""
    config_class, _ = COMMANDS[command]
    parser = argparse.ArgumentParser(
        prog=f"predict.py {command}",
        description=config_class.__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    add_settings(parser, config_class, exclude=config_class.unused)
    add_overrides(
        parser.add_argument_group(
            "model settings: default the checkpoint's (the calibration's overrides for score and "
            "export); test-time ones override it, architectural ones must equal it"
        ),
        [MODELS[name].config_class for name in models or MODELS],
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[str, FieldConfig, dict]:
    """(command, its checked config, the model settings given)."""
    top = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="predict.py COMMAND --help lists a command's flags",
    )
    top.add_argument("command", choices=tuple(COMMANDS), help="calibrate, score or export")
    top.add_argument("flags", nargs=argparse.REMAINDER, help="the command's flags")
    known = top.parse_args(argv)
    config_class, _ = COMMANDS[known.command]
    models = flag_models(known.flags)
    parser = build_parser(known.command, models)
    classes = [MODELS[name].config_class for name in models]
    config, overrides = parse_config(parser, known.flags, config_class, classes)
    return known.command, config, overrides


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def body() -> None:
        command, config, overrides = parse_args(argv)
        with contextlib.ExitStack() as stack:
            log_file = None
            if command == "score":  # its files in --out are many: one run at a time writes them
                check_writable(config.out, "--out")  # before any work
                stack.enter_context(folder_lock(config.out, SCORE_LOCK, "scoring", "--out"))
                log_file = config.out / "predict.log"
            setup_logging(log_file, config.log_level)
            COMMANDS[command][1](config, overrides)

    return run_script(body, logger)


if __name__ == "__main__":
    raise SystemExit(main())
