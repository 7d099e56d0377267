"""Settings: each one a dataclass field, declared once (default, help, kind), from which the
command-line flags, the YAML validation and the checkpoint's stored config are generated.

The shape of nanoGPT's `GPTConfig` and open_clip's `CLIPVisionCfg`, with timm's YAML-then-CLI
order: `--config FILE` sets defaults, flags win, unknown keys are refused. A field's kind says
what it governs:

* `ARCH`: what the trained weights mean (backbone, adapter shapes, blend weights). A checkpoint
  is loaded only into a model with the same values; test time never changes them.
* `TEST`: how a trained model predicts (smoothing, which modules run at test); a test run may
  override them.
* `TRAIN`: the training recipe (epochs, learning rates, loss constants); read only when training.
* `RUN`: where and how a script runs (data set, device, outputs, seed).

Aliases keep the originals' names as flags and YAML/checkpoint keys: `--tap_indices` is FE-CLIP's
name of `block_indices`; an alias with an offset counts from it (AA-CLIP's 1-based `--levels`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shlex
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from utils.core.checkpoint import atomic_write
from utils.core.errors import CheckpointError, ConfigError
from utils.core.names import did_you_mean

logger = logging.getLogger(__name__)

ARCH, TEST, TRAIN, RUN = "arch", "test", "train", "run"
KINDS = (ARCH, TEST, TRAIN, RUN)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def setting(
    default: Any,
    help: str,
    *,
    kind: str = TRAIN,
    choices: Iterable[Any] | None = None,
    nargs: str | int | None = None,
    aliases: dict[str, int] | None = None,
    original: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    metavar: str | tuple[str, ...] | None = None,
    required: bool = False,
    command_line_only: bool = False,
) -> Any:
    """A dataclass field that is a setting.

    Args:
        help: one sentence for `--help` (the default is appended there).
        choices: the allowed values.
        nargs: for list settings (default `+`).
        aliases: other names of the setting -> offset of their counting base (0: same values);
            for a bool, a `no_` alias switches it off (`--no_progress`).
        original: the alias that is the original code's name, used in hints (`tap_indices`).
        minimum / maximum / above: the value must be >= `minimum`, <= `maximum`, > `above`
            (checked by `validate`).
        required: the flag must be given (its default only types the field).
        command_line_only: a switch of trust (pickle loading) that a YAML file may not set; a
            run that sets it logs a warning.
    """
    assert kind in KINDS, kind
    metadata = {
        "help": help,
        "kind": kind,
        "choices": tuple(choices) if choices is not None else None,
        "nargs": nargs,
        "aliases": dict(aliases or {}),
        "original": original,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "metavar": metavar,
        "required": required,
        "command_line_only": command_line_only,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def redefault(config_class: type, name: str, default: Any, **metadata: Any) -> Any:
    """The field `name` of `config_class` with another default (a subclass's own value) and,
    where given, its own `help`, `aliases`, `original` (the model's name of a shared setting) or
    `required` (a flag a command must be given); its type, kind and checks stay the
    declaration's."""
    base = next(field for field in dataclasses.fields(config_class) if field.name == name)
    unknown = set(metadata) - {"help", "aliases", "original", "required"}
    assert not unknown, unknown
    merged = {**base.metadata, **metadata}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=merged)
    return dataclasses.field(default=default, metadata=merged)


# ---------------------------------------------------------------------------------------------
# Fields


def settings_of(config_class: type, kinds: Iterable[str] = KINDS) -> list[dataclasses.Field]:
    """The setting fields of a config class whose kind is in `kinds`, declaration order."""
    kinds = set(kinds)
    return [field for field in dataclasses.fields(config_class) if field.metadata["kind"] in kinds]


def field_type(config_class: type, field: dataclasses.Field) -> tuple[type, bool]:
    """(scalar type, is a list) of a field: `list[int] | None` -> (int, True)."""
    annotation = typing.get_type_hints(config_class)[field.name]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _is_optional(config_class: type, field: dataclasses.Field) -> bool:
    annotation = typing.get_type_hints(config_class)[field.name]
    return type(None) in typing.get_args(annotation)


def _has_type(value: Any, scalar: type) -> bool:
    """A YAML or stored value of a scalar setting type (no bool for a number, str for a path)."""
    if scalar is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if scalar is float:
        return isinstance(value, int | float)
    if scalar is Path:
        return isinstance(value, str | Path)
    return isinstance(value, scalar)


def type_name(config_class: type, field: dataclasses.Field) -> str:
    """How a setting's type reads in a message: `int`, `list of int`, `path or null`."""
    scalar, is_list = field_type(config_class, field)
    name = "path" if scalar is Path else getattr(scalar, "__name__", str(scalar))
    count = field.metadata["nargs"] if isinstance(field.metadata["nargs"], int) else ""
    name = f"list of {count} {name}".replace("  ", " ") if is_list else name
    return f"{name} or null" if _is_optional(config_class, field) else name


def has_setting_type(config_class: type, field: dataclasses.Field, value: Any) -> bool:
    """Whether `value` fits the field's declared type (int, float, str, bool, Path, a list of
    one of them, optionally None)."""
    if value is None:
        return _is_optional(config_class, field)
    scalar, is_list = field_type(config_class, field)
    if is_list:
        count = field.metadata["nargs"]
        if isinstance(count, int) and (not isinstance(value, list | tuple) or len(value) != count):
            return False
        return isinstance(value, list | tuple) and all(_has_type(item, scalar) for item in value)
    return _has_type(value, scalar)


def check_types(source: str, mapping: dict[str, Any], config_classes: Iterable[type]) -> None:
    """Refuse a value of `mapping` (keys: field names or aliases) whose type is not its
    setting's; one line naming `source`, the key, the value and the expected type."""
    declared: dict[str, list[tuple[type, dataclasses.Field]]] = {}
    for config_class in config_classes:
        for field in dataclasses.fields(config_class):
            for key in (field.name, *field.metadata["aliases"]):
                declared.setdefault(key, []).append((config_class, field))
    for key, value in mapping.items():
        fields = declared.get(key)
        if fields and not any(has_setting_type(cls, field, value) for cls, field in fields):
            expected = type_name(*fields[0])
            msg = f"{source}: {key} is {value!r}, expected a value of type {expected}; fix it there"
            raise ConfigError(msg)


def _shift(value: Any, offset: int) -> Any:
    if offset == 0 or value is None:
        return value
    if isinstance(value, list | tuple):
        return [item + offset for item in value]
    return value + offset


def keys_of(*config_classes: type) -> set[str]:
    """Every key (field names and aliases) the classes accept in YAML and stored configs."""
    keys: set[str] = set()
    for config_class in config_classes:
        for field in dataclasses.fields(config_class):
            keys.add(field.name)
            keys.update(field.metadata["aliases"])
    return keys


def from_mapping(
    config_class: type, mapping: dict[str, Any], source: str = "the stored config"
) -> Any:
    """An instance from a mapping of field names or aliases (other keys are ignored, missing
    fields take their defaults): how a checkpoint's stored config is read back. A value of the
    wrong type, or a float that is not finite, raises ConfigError naming `source`."""
    check_types(source, mapping, [config_class])
    for key, value in mapping.items():
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(item, float) and not math.isfinite(item) for item in values):
            raise ConfigError(f"{source}: {key}: {value} is not a finite number")
    values = {}
    for field in dataclasses.fields(config_class):
        if field.name in mapping:
            values[field.name] = mapping[field.name]
            continue
        for alias, offset in field.metadata["aliases"].items():
            if alias in mapping:
                value = mapping[alias]
                if isinstance(value, bool) and alias.startswith("no_"):
                    value = not value
                values[field.name] = _shift(value, -offset)
                break
    for name, value in values.items():
        field = next(field for field in dataclasses.fields(config_class) if field.name == name)
        scalar, is_list = field_type(config_class, field)
        if is_list and isinstance(value, tuple):
            values[name] = list(value)
        elif scalar is Path and value is not None:
            values[name] = Path(value)
    return config_class(**values)


def to_mapping(config: Any) -> dict[str, Any]:
    """A config's fields as plain YAML-ready values (paths as strings), plus each setting's value
    under the original code's name where it has one (`tap_indices`, 1-based `levels`), so a
    stored config reads in either vocabulary."""
    mapping = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(config).items()
    }
    for field in dataclasses.fields(config):
        original = field.metadata["original"]
        if original:
            mapping[original] = _shift(mapping[field.name], field.metadata["aliases"][original])
    return mapping


def validate(config: Any) -> None:
    """Check every field's `choices`, `minimum`, `maximum` and `above`, and that every float is
    finite (NaN passes no comparison, and no setting gives infinity a meaning); one line naming
    the flag."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        meta = field.metadata
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(item, float) and not math.isfinite(item) for item in values):
            raise ConfigError(f"--{field.name} {value} must be a finite number")
        if meta["choices"] is not None and any(item not in meta["choices"] for item in values):
            wrong = next(item for item in values if item not in meta["choices"])
            hint = did_you_mean(str(wrong), [str(choice) for choice in meta["choices"]])
            choices = ", ".join(str(choice) for choice in meta["choices"])
            raise ConfigError(f"--{field.name} {value} is not one of {choices}{hint}")
        if meta["minimum"] is not None and any(item < meta["minimum"] for item in values):
            raise ConfigError(f"--{field.name} {value} must be >= {meta['minimum']:g}")
        if meta["maximum"] is not None and any(item > meta["maximum"] for item in values):
            raise ConfigError(f"--{field.name} {value} must be <= {meta['maximum']:g}")
        if meta["above"] is not None and any(item <= meta["above"] for item in values):
            raise ConfigError(f"--{field.name} {value} must be > {meta['above']:g}")


# ---------------------------------------------------------------------------------------------
# Command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every flag's default, unless its help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        return text if "(default" in text else super()._get_help_string(action)


def add_settings(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_class: type,
    kinds: Iterable[str] = KINDS,
    defaults: dict[str, Any] | None = None,
    suppress: bool = False,
    exclude: Iterable[str] = (),
    seen: set[str] | None = None,
) -> None:
    """Add a flag per setting of `config_class` (kinds in `kinds`, not in `exclude`).

    `defaults` replaces field defaults (a model's own run defaults); `suppress` leaves a flag
    that is not given out of the namespace (test time: "the checkpoint's value"). `seen` collects
    the flags already added, so several classes can share one parser.
    """
    defaults = defaults or {}
    seen = set() if seen is None else seen
    excluded = set(exclude)
    for field in settings_of(config_class, kinds):
        if field.name in excluded:
            continue
        meta = field.metadata
        scalar, is_list = field_type(config_class, field)
        nargs = (meta["nargs"] or "+") if is_list else None
        if field.name not in seen:
            seen.add(field.name)
            if suppress:
                default = argparse.SUPPRESS
            elif field.name in defaults:
                default = defaults[field.name]
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = field.default
            kwargs: dict[str, Any] = {"default": default, "help": meta["help"], "dest": field.name}
            if meta["required"]:
                kwargs["required"] = True
            if meta["metavar"] is not None:
                kwargs["metavar"] = meta["metavar"]
            if scalar is bool and not is_list:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs.update(type=scalar, nargs=nargs)
                if meta["choices"] is not None and "metavar" not in kwargs:
                    # checked by `validate` (a near miss gets a "did you mean"), shown as argparse
                    # shows choices
                    kwargs["metavar"] = "{" + ",".join(str(item) for item in meta["choices"]) + "}"
            parser.add_argument(f"--{field.name}", **kwargs)
        for alias, offset in meta["aliases"].items():
            if alias in seen:
                continue
            seen.add(alias)
            if scalar is bool:  # `--no_progress`: an alias that switches the setting off
                action = "store_false" if alias.startswith("no_") else "store_true"
                parser.add_argument(
                    f"--{alias}",
                    dest=field.name,
                    action=action,
                    default=argparse.SUPPRESS,
                    help=f"alias of --{'no-' if action == 'store_false' else ''}{field.name}",
                )
                continue
            parser.add_argument(
                f"--{alias}",
                dest=field.name,
                nargs=nargs,
                type=(lambda text, offset=offset: int(text) - offset) if offset else scalar,
                default=argparse.SUPPRESS,
                help=f"alias of --{field.name}" + (f", counted from {offset}" if offset else ""),
            )


def from_namespace(config_class: type, namespace: argparse.Namespace) -> Any:
    """An instance from the parsed flags of `config_class` (absent ones take their defaults)."""
    given = vars(namespace)
    return config_class(
        **{f.name: given[f.name] for f in dataclasses.fields(config_class) if f.name in given}
    )


def setting_names(config_classes: Iterable[type], kinds: Iterable[str]) -> set[str]:
    """Names (and aliases) of the classes' settings of these kinds."""
    names: set[str] = set()
    kinds = tuple(kinds)
    for config_class in config_classes:
        for field in settings_of(config_class, kinds):
            names |= {field.name, *field.metadata["aliases"]}
    return names


def add_overrides(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_classes: Iterable[type]
) -> None:
    """Flags for the `TEST` and `ARCH` settings of every class (shared names added once), left
    out of the namespace when not given: a trained model's own values are the defaults."""
    seen: set[str] = set()
    for config_class in config_classes:
        add_settings(parser, config_class, (TEST, ARCH), suppress=True, seen=seen)


def given_overrides(namespace: argparse.Namespace, config_classes: Iterable[type]) -> dict:
    """The settings of `add_overrides` that were given (on the command line or in --config)."""
    names = setting_names(config_classes, (TEST, ARCH))
    return {name: value for name, value in vars(namespace).items() if name in names}


def flag_hint(field: dataclasses.Field | None, key: str, value: Any) -> str:
    """The command-line flag that sets `key` to `value` (under the original's name, in its own
    counting, where the setting has one), quoted for a shell: `--no-relu`,
    `--tap_indices 15 18 21 23`."""
    if field is not None and field.metadata["original"]:
        key = field.metadata["original"]
        value = _shift(value, field.metadata["aliases"][key])
    if isinstance(value, bool):
        return f"--{key}" if value else f"--no-{key}"
    if value is None:
        return f"no --{key}"
    values = value if isinstance(value, list | tuple) else [value]
    return f"--{key} " + " ".join(shlex.quote(str(item)) for item in values)


def check_architecture(path: Path, saved: Any, current: Any) -> None:
    """Raise CheckpointError naming the first `ARCH` setting where the config a checkpoint was
    trained with (`saved`, an instance of `current`'s class or a base class) differs."""
    for field in settings_of(type(saved), (ARCH,)):
        old, new = getattr(saved, field.name), getattr(current, field.name)
        if old != new:
            msg = (
                f"{path} was trained with {field.name}={old!r} but this run has "
                f"{field.name}={new!r}; pass {flag_hint(field, field.name, old)}"
            )
            raise CheckpointError(msg)


def override(config: Any, overrides: dict[str, Any], path: Path) -> Any:
    """`config` with the `TEST` settings in `overrides` replaced; an `ARCH` one that differs
    is refused (the checkpoint defines it), `TRAIN`/`RUN` ones and other models' keys ignored."""
    by_name = {field.name: field for field in dataclasses.fields(config)}
    changes = {}
    for key, value in overrides.items():
        field = by_name.get(key)
        if field is None or field.metadata["kind"] in (TRAIN, RUN):
            continue
        if field.metadata["kind"] == ARCH:
            if value != getattr(config, key):
                msg = (
                    f"{path} was trained with {key}={getattr(config, key)!r} but this run has "
                    f"{key}={value!r}; pass {flag_hint(field, key, getattr(config, key))} or "
                    "leave the flag out (the checkpoint defines the architecture)"
                )
                raise CheckpointError(msg)
            continue
        changes[key] = value
    if not changes:
        return config
    changed = dataclasses.replace(config, **changes)
    validate(changed)  # the flags' choices and bounds, as for the script's own settings
    return changed


# ---------------------------------------------------------------------------------------------
# YAML


def parse_with_config(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    config_classes: Iterable[type],
    ignore: set[str] | frozenset[str] = frozenset(),
    model: str | None = None,
) -> argparse.Namespace:
    """Parse `argv` over the defaults of `--config FILE` (if given).

    A YAML key that is no setting of `config_classes` (nor an alias) is an error, since a typo
    would otherwise be ignored, and so is a value of the wrong type or a `command_line_only`
    key; keys the parser has no flag for, and keys in `ignore` (test.py: a training run's
    architecture and recipe, which the checkpoint holds), are accepted and left out. A file
    whose `model` is not `model` is refused.
    """
    config_classes = tuple(config_classes)
    known = keys_of(*config_classes)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    config_file = pre.parse_known_args(argv)[0].config
    if config_file is not None:
        defaults = load_yaml(config_file)
        if not isinstance(defaults.get("model", ""), str):
            raise ConfigError(f"{config_file}: model: {defaults['model']!r} is not a model name")
        if model is not None and defaults.get("model", model) != model:
            msg = f"{config_file} configures {defaults['model']}; pass --model {defaults['model']}"
            raise ConfigError(f"{msg} or a {model} file")
        unknown = sorted(set(defaults) - known - {"model"})
        if unknown:
            raise ConfigError(f"{config_file} has unknown keys {unknown}; valid: {sorted(known)}")
        for key in sorted(set(defaults) & command_line_only(config_classes)):
            msg = f"{config_file} sets {key}, which only the command line may: remove it there"
            raise ConfigError(f"{msg} and pass --{key} if you mean it")
        check_types(str(config_file), defaults, config_classes)
        applied = {key: value for key, value in defaults.items() if key not in ignore}
        parser.set_defaults(**parser_defaults(parser, applied))
    args = parser.parse_args(argv)
    args.config = config_file
    for key in sorted(command_line_only(config_classes)):
        if getattr(args, key, False):
            logger.warning("--%s is on: %s", key, _help_of(config_classes, key))
    return args


def command_line_only(config_classes: Iterable[type]) -> set[str]:
    """Names and aliases of the `command_line_only` settings of the classes."""
    return {
        key
        for config_class in config_classes
        for field in dataclasses.fields(config_class)
        if field.metadata["command_line_only"]
        for key in (field.name, *field.metadata["aliases"])
    }


def _help_of(config_classes: Iterable[type], name: str) -> str:
    for config_class in config_classes:
        for field in dataclasses.fields(config_class):
            if field.name == name:
                return field.metadata["help"]
    return ""


def parse_config(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    config_class: type,
    override_classes: Iterable[type] = (),
    ignore: set[str] | frozenset[str] = frozenset(),
    also_known: Iterable[type] = (),
) -> tuple[Any, dict[str, Any]]:
    """A script's settings: `argv` over `--config` defaults (`parse_with_config`) -> (a checked
    `config_class` instance, the `add_overrides` settings given for `override_classes`).
    `also_known`: other classes whose keys a `--config` file may hold (and `ignore`)."""
    override_classes = tuple(override_classes)
    classes = (config_class, *override_classes, *also_known)
    args = parse_with_config(parser, argv, classes, ignore)
    config = from_namespace(config_class, args)
    validate(config)
    return config, given_overrides(args, override_classes)


def parser_defaults(parser: argparse.ArgumentParser, values: dict[str, Any]) -> dict[str, Any]:
    """YAML values keyed by the parser's destinations (aliases translated, offsets applied)."""
    by_option = {}
    for action in parser._actions:
        for option in action.option_strings:
            by_option[option.lstrip("-")] = action
    out = {}
    for key, value in values.items():
        action = by_option.get(key)
        if action is None:
            continue
        if action.dest != key and action.type is not None and isinstance(value, list):
            value = [action.type(str(item)) for item in value]
        if isinstance(action, argparse._StoreFalseAction) and isinstance(value, bool):
            value = not value  # `no_progress: true` means progress off
        out[action.dest] = value
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping of setting names; a missing, non-UTF-8 or malformed file raises a
    one-line ConfigError (the file, line and column, and the parser's problem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        msg = f"config file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        raise ConfigError(msg) from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        msg = f"config file {path}{where} is not valid YAML ({problem}); fix it there"
        raise ConfigError(msg) from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    if any(not isinstance(key, str) for key in data):
        bad = next(key for key in data if not isinstance(key, str))
        raise ConfigError(f"config file {path} has a key {bad!r} that is no setting name")
    return data


def save_yaml(path: Path, settings: dict[str, Any]) -> None:
    """Write settings as YAML atomically (paths as strings)."""
    plain = {
        key: str(value) if isinstance(value, Path) else value for key, value in settings.items()
    }
    text = yaml.safe_dump(plain, sort_keys=True)
    atomic_write(Path(path), lambda file: file.write(text), mode="w")
