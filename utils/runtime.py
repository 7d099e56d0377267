"""Run-time plumbing: logging, seeds, device selection."""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from utils.errors import ConfigError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_own_handlers: list[logging.Handler] = []


def setup_logging(log_file: Path | None = None, level: str = "INFO") -> None:
    """Console logging (and a file in the save path); only scripts call this.

    Calling it again replaces the handlers it added before and leaves others (e.g. pytest's).
    """
    root = logging.getLogger()
    for handler in _own_handlers:
        root.removeHandler(handler)
        handler.close()
    _own_handlers.clear()
    _own_handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        _own_handlers.append(logging.FileHandler(log_file))
    for handler in _own_handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed random, numpy, torch (CPU and CUDA); optionally deterministic kernels.

    The original calls `torch.use_deterministic_algorithms(True)`; we use `warn_only=True`, so a
    kernel without a deterministic version warns instead of stopping the run. Some CUDA kernels
    (e.g. interpolate backward) stay non-deterministic: expect small run-to-run variation on GPU.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None): CUDA when available, else CPU; otherwise the named device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but none is available; use --device cpu")
    return device


def rng_state() -> dict:
    """Python, numpy and torch RNG states, for exact resumes."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
