"""YAML defaults + command-line overrides (timm's `_parse_args` shape, unknown keys refused).

`--config FILE` loads a YAML of defaults into the parser; flags given on the command line win.
The merged settings are saved next to the outputs so a run can be reproduced.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from utils.checkpoint import atomic_write
from utils.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TINY_IMG_SIZE = 64
PAPER_MODEL = "ViT-L-14-336"
PAPER_IMG_SIZE = 518


def parse_with_config(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    default_config: Path | None,
    tolerated: set[str] | frozenset[str] = frozenset(),
) -> argparse.Namespace:
    """Parse `argv` over the defaults of `--config` (or `default_config`).

    A YAML key the parser does not know is an error (a typo would otherwise be silently
    ignored), except keys in `tolerated`: settings of a sibling script sharing the YAML.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=default_config)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        defaults = load_yaml(known.config)
        valid = parser_keys(parser)
        unknown = sorted(set(defaults) - valid - set(tolerated))
        if unknown:
            msg = f"{known.config} has unknown keys {unknown}; valid keys: {sorted(valid)}"
            raise ConfigError(msg)
        parser.set_defaults(**{key: value for key, value in defaults.items() if key in valid})
    args = parser.parse_args(argv)
    args.config = known.config
    return args


def parser_keys(parser: argparse.ArgumentParser) -> set[str]:
    """Every setting name a parser accepts."""
    return {action.dest for action in parser._actions} - {"help"}


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping; a missing or malformed file raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def save_yaml(path: Path, settings: dict[str, Any]) -> None:
    """Write settings as YAML atomically (paths as strings)."""
    plain = {
        key: str(value) if isinstance(value, Path) else value for key, value in settings.items()
    }
    text = yaml.safe_dump(plain, sort_keys=True)
    atomic_write(Path(path), lambda file: file.write(text), mode="w")


def resolve_backbone_defaults(
    args: argparse.Namespace, paper_img_size: int = PAPER_IMG_SIZE
) -> None:
    """Fill `model_name`/`img_size` left unset: tiny at 64 px for Synthetic, the paper's
    ViT-L-14-336 at `paper_img_size` (AA-CLIP 518, FE-CLIP and SOWA 336) for real data sets."""
    if args.model_name is None:
        args.model_name = "tiny" if args.dataset == "Synthetic" else PAPER_MODEL
    if args.img_size is None:
        args.img_size = TINY_IMG_SIZE if args.model_name == "tiny" else paper_img_size


def add_clip_args(
    parser: argparse.ArgumentParser, quick_gelu: bool = False
) -> argparse._ArgumentGroup:
    """Flags that define the frozen CLIP: `--model_name`, `--pretrained`, `--quick_gelu`,
    `--img_size`. Returns the group so a model can add its own flags to it."""
    group = parser.add_argument_group("backbone and adapters")
    group.add_argument(
        "--model_name",
        default=None,
        help="'tiny' (random test backbone) or an open_clip model; default: tiny "
        "for --dataset Synthetic, else ViT-L-14-336",
    )
    group.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip weight tag or a local weights file (ignored for tiny)",
    )
    group.add_argument(
        "--quick_gelu",
        action=argparse.BooleanOptionalAction,
        default=quick_gelu,
        help="QuickGELU as OpenAI trained (the released AA-CLIP runs exact GELU)",
    )
    group.add_argument(
        "--img_size",
        type=int,
        default=None,
        help="input side; default 64 for tiny, else the paper's",
    )
    return group


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    """The frozen CLIP's flags and AA-CLIP's adapter flags (must match at test)."""
    group = add_clip_args(parser)
    group.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=[6, 12, 18, 24],
        help="1-based vision block outputs used for maps",
    )
    group.add_argument("--text_adapt_until", type=int, default=3)
    group.add_argument("--image_adapt_until", type=int, default=6)
    group.add_argument("--text_adapt_weight", type=float, default=0.1)
    group.add_argument("--image_adapt_weight", type=float, default=0.1)
    group.add_argument(
        "--relu",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="LeakyReLU after seg/det projections (published runs: off)",
    )


def add_data_args(parser: argparse.ArgumentParser, dataset_help: str) -> None:
    """Data set selection and loading flags."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="Synthetic", help=dataset_help)
    group.add_argument(
        "--data_root",
        type=Path,
        default=None,
        help="data set folder; default data/<dataset> (Synthetic is generated there)",
    )
    group.add_argument(
        "--metadata_dir",
        type=Path,
        default=None,
        help="where the *.jsonl record files live; default: the data root",
    )
    group.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="DataLoader workers; default 4 on CUDA, 0 on CPU",
    )


def add_run_args(parser: argparse.ArgumentParser, save_path_help: str) -> None:
    """Where outputs go, device, seed, logging."""
    group = parser.add_argument_group("run")
    group.add_argument("--config", type=Path, default=None, help="YAML of defaults")
    group.add_argument("--save_path", type=Path, default=Path("ckpt/aaclip"), help=save_path_help)
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--seed", type=int, default=111)
    group.add_argument("--log_level", default="INFO")
