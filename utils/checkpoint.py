"""Checkpoints: nanoGPT's dict (weights, optimizer, step, config), written atomically.

A save goes to a temporary file beside the target and is moved over it with `os.replace`, so
an interrupted save leaves the previous checkpoint intact. A model's stored config is compared
with the current one by `utils.config.check_architecture`, which names the flag that differs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from utils.errors import CheckpointError

logger = logging.getLogger(__name__)


def atomic_write(path: Path, write: Any, mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, then move it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """`torch.save(payload)` to `path` atomically."""
    atomic_write(Path(path), lambda file: torch.save(payload, file))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict; a missing or unreadable file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check --save_path/--checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        msg = f"checkpoint {path} cannot be read ({type(error).__name__}); delete it and retrain"
        raise CheckpointError(msg) from error
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is not a dict of tensors; was it written here?")
    return payload
