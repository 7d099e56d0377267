"""What every model shares, declared once in models/base.py: the block indices and their check."""

from __future__ import annotations

import pytest

from models.aaclip import AAClip, AAClipConfig
from models.feclip import FEClip, FEClipConfig
from models.sowa import SOWA, SOWAConfig
from utils.core.errors import ConfigError


@pytest.mark.parametrize(
    ("model", "config", "shown"),
    [
        (AAClip, AAClipConfig, "--levels 6 12 25"),  # the original's 1-based levels
        (FEClip, FEClipConfig, "--tap_indices 5 11 24"),
        (SOWA, SOWAConfig, "--feature_map_idx 5 11 24"),
    ],
)
def test_block_indices_are_checked_once_naming_the_originals_flag(tiny_clip, model, config, shown):
    for indices in ([5, 11, 24], [11, 5], []):
        with pytest.raises(ConfigError, match="must be increasing 0-based indices") as error:
            model(config(model_name="tiny", img_size=64, block_indices=indices), tiny_clip)
    assert "--block_indices []" in str(error.value)
    with pytest.raises(ConfigError) as error:
        model(config(model_name="tiny", img_size=64, block_indices=[5, 11, 24]), tiny_clip)
    assert shown in str(error.value) and "24 vision blocks" in str(error.value)
