"""One place per setting: the config dataclasses generate flags, YAML validation and hints.

configs/*.yaml are readable views of the dataclass defaults (checked equal here); every flag
has a help text with its default; a checkpoint-mismatch hint is a command line the parser takes.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
import yaml

import test as test_script
from models.aaclip import AAClipConfig
from models.aaclip_cross_attn import AAClipCrossAttnConfig
from models.registry import MODELS
from utils.core.config import ARCH, CONFIG_DIR, flag_hint, from_mapping, settings_of, to_mapping
from utils.engine import job as training_job
from utils.engine.training import RunConfig


def default_of(config_class: type, field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@pytest.mark.parametrize("name", list(MODELS))
def test_config_files_mirror_the_dataclass_defaults(name):
    config_class = MODELS[name].config_class
    values = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert values.pop("model") == name
    expected = {}
    for config, defaults in ((RunConfig, config_class.run_defaults), (config_class, {})):
        for field in dataclasses.fields(config):
            value = defaults.get(field.name, default_of(config, field))
            expected[field.name] = str(value) if isinstance(value, Path) else value
    for key, value in values.items():
        assert value == expected[key], key
    own = {field.name for field in dataclasses.fields(config_class)}
    if name == "aaclip_cross_attn":  # AA-CLIP's settings are inherited from the base run
        own -= {field.name for field in dataclasses.fields(AAClipConfig)}
    assert own <= set(values), sorted(own - set(values))


@pytest.mark.parametrize("name", ["aaclip", "feclip", "sowa"])
def test_training_takes_each_models_yaml(name, tmp_path):
    job = training_job.parse_args(["--config", str(CONFIG_DIR / f"{name}.yaml")], name)
    assert job.config == job.model_class.config_class().resolve("Synthetic")
    with pytest.raises(Exception, match="configures (sowa|feclip); pass --model"):
        other = "sowa" if name != "sowa" else "feclip"
        training_job.parse_args(["--config", str(CONFIG_DIR / f"{other}.yaml")], name)


def test_unknown_yaml_key_is_refused_with_the_valid_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lambda_fuze: 0.2\n")
    with pytest.raises(Exception, match=r"unknown keys \['lambda_fuze'\].*lambda_fuse"):
        training_job.parse_args(["--config", str(path)], "feclip")


def test_test_py_offers_every_models_test_time_settings():
    _, overrides = test_script.parse_args(
        ["--smoothing_sigma", "2", "--stage_reduce", "mean", "--cross_attn_at_test", "none"]
    )
    assert overrides == {
        "smoothing_sigma": 2.0,
        "stage_reduce": "mean",
        "cross_attn_at_test": "none",
    }


def alternative(value):
    """Another value of the same type, for a hint that differs from the default."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return [item + 1 if not isinstance(item, str) else item + " x" for item in value]
    if isinstance(value, str):
        return value
    if value is None:
        return 64
    return value * 2


@pytest.mark.parametrize("name", list(MODELS))
def test_every_architecture_hint_is_a_command_line_the_parsers_accept(name):
    """A checkpoint-mismatch hint (`pass --no-relu`, `pass --tap_indices 15 18 21 23`) fed back
    to the training parser and to test.py's gives the checkpoint's value."""
    config_class = MODELS[name].config_class
    for field in settings_of(config_class, (ARCH,)):
        value = alternative(default_of(config_class, field))
        if field.name == "model_name":
            value = "tiny"
        hint = shlex.split(flag_hint(field, field.name, value))
        parsed = training_job.build_parser(MODELS[name]).parse_args(hint)
        assert getattr(parsed, field.name) == value, (field.name, hint)
        assert test_script.parse_args(hint)[1][field.name] == value, (field.name, hint)


def test_levels_alias_counts_from_one_and_the_stored_config_keeps_both_names():
    job = training_job.parse_args(["--levels", "6", "12", "18", "24"])
    assert job.config.block_indices == [5, 11, 17, 23]
    stored = to_mapping(job.config)
    assert stored["block_indices"] == [5, 11, 17, 23] and stored["levels"] == [6, 12, 18, 24]
    assert from_mapping(AAClipConfig, {"levels": [6, 12, 18, 24]}).block_indices == [5, 11, 17, 23]
    cross = from_mapping(AAClipCrossAttnConfig, {"tap_indices": [1]})  # another model's alias
    assert cross.block_indices == [5, 11, 17, 23]


@pytest.mark.parametrize("name", ["feclip", "sowa"])
def test_the_single_stage_models_train_on_the_whole_test_split_as_their_originals(name):
    job = training_job.parse_args([], name)
    assert job.run.training_mode == "full_shot"
    # a shot given alone means few-shot; with --training_mode full_shot it has no effect
    few = training_job.parse_args(["--shot", "8"], name).run
    assert (few.training_mode, few.shot) == ("few_shot", 8)
    with pytest.raises(Exception, match="--shot 8 has no effect in full_shot mode"):
        training_job.parse_args(["--shot", "8", "--training_mode", "full_shot"], name)
    assert (
        training_job.parse_args(["--training_mode", "few_shot", "--shot", "8"], name).run.shot == 8
    )
