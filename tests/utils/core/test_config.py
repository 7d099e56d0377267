"""Settings checks (utils/core/config.py `validate`): NaN and infinity are refused for every
float setting, in one line naming the flag, before any comparison could let them through."""

from __future__ import annotations

import dataclasses

import pytest

from datasets.tiling import TileConfig
from utils.core.config import RUN, from_mapping, setting, validate
from utils.core.errors import ConfigError


@dataclasses.dataclass
class Rates:
    lr: float = setting(1e-3, "a rate", kind=RUN, above=0)
    betas: list[float] = setting([0.9, 0.999], "two rates", kind=RUN, minimum=0, maximum=1)
    weight: float | None = setting(None, "unbounded", kind=RUN)


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"lr": float("nan")}, "--lr nan"),
        ({"lr": float("inf")}, "--lr inf"),
        ({"betas": [0.9, float("nan")]}, "--betas [0.9, nan]"),
        ({"weight": float("-inf")}, "--weight -inf"),  # no bound given, still refused
    ],
)
def test_non_finite_floats_are_refused(values, flag):
    with pytest.raises(ConfigError, match="must be a finite number") as caught:
        validate(Rates(**values))
    assert str(caught.value).startswith(flag)


def test_finite_values_and_unset_ones_pass():
    validate(Rates())
    validate(Rates(lr=2.0, betas=[0.0, 1.0], weight=-3.5))


@pytest.mark.parametrize(("name", "value"), [("tile_overlap", "nan"), ("tile_scale", "inf")])
def test_a_tiling_flag_of_nan_or_inf_is_refused(name, value):
    with pytest.raises(ConfigError, match=f"--{name} {value} must be a finite number"):
        validate(TileConfig(tile=64, **{name: float(value)}))


def test_a_stored_config_with_nan_is_refused_naming_its_source():
    with pytest.raises(ConfigError, match=r"ckpt/x\.pth: lr: nan is not a finite number"):
        from_mapping(Rates, {"lr": float("nan")}, "ckpt/x.pth")
    assert from_mapping(Rates, {"lr": 0.5, "betas": [0.1, 0.2]}, "ckpt/x.pth").lr == 0.5
