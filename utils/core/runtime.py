"""Run-time plumbing: every script's run settings, logging, exit codes, progress bars, seeds,
device and mixed precision."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import resource
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from utils.core.config import RUN, setting
from utils.core.errors import ConfigError, StorageError, UserError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("none", "bf16", "fp16", "auto")
_WARNED_AMP: set[str] = set()  # an emulated precision warns once per process


@dataclasses.dataclass
class RuntimeConfig:
    """How a script runs: defaults file, device, seed, logs, workers, trust, progress, precision
    (every script's flags; scripts pass them on, nothing is switched process-wide)."""

    config: Path | None = setting(
        None, "YAML of defaults, e.g. configs/<model>.yaml; flags given here win", kind=RUN
    )
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...", kind=RUN)
    seed: int = setting(111, "seed of initialisation, sampling and augmentation", kind=RUN)
    log_level: str = setting("INFO", "logging level (DEBUG, INFO, WARNING)", kind=RUN)
    num_workers: int | None = setting(
        None,
        "DataLoader workers; unset: training 4 on CUDA, 0 on CPU; evaluation on CUDA all cores "
        "but one (up to 16), on CPU one per 8 cores",
        kind=RUN,
        minimum=0,
    )
    trust_checkpoint: bool = setting(
        False,
        "allow loading checkpoints that need pickle (the original code's; pickle can run code)",
        kind=RUN,
        command_line_only=True,
    )
    progress: bool = setting(
        True,
        "progress bars (shown only on a terminal)",
        kind=RUN,
        aliases={"no_progress": 0},
    )
    amp: str = setting(
        "none",
        "autocast for the backbone and adapters (fp32 by default, as the originals; auto: bf16 "
        "where the device computes it natively, else fp32); maps and losses stay float32",
        kind=RUN,
        choices=AMP_CHOICES,
    )


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
        try:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            # a file name that is not UTF-8 is logged with its odd bytes as \xNN
            handler = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
            _own_handlers.append(handler)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            msg = f"cannot write the log {log_file} ({reason}); choose another folder"
            raise StorageError(msg) from error
    for handler in _own_handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())
    # A full disk must not print a logging traceback per line; the write that matters raises.
    logging.raiseExceptions = False


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is, like KeyboardInterrupt for SIGINT."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def run_script(body: Callable[[], None], log: logging.Logger) -> int:
    """Run a script's body with the project's exit codes: 0; for a `UserError` its message as
    one logged line and 2 (no traceback for a user mistake); for Ctrl-C 130 and SIGTERM 143,
    one line each (every file is written atomically, so what was complete stays complete)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        body()
    except UserError as error:
        # Errors raised in DataLoader workers arrive wrapped; the last line is the message.
        log.error("%s", str(error).strip().splitlines()[-1])
        return 2
    except (KeyboardInterrupt, _Terminated) as stop:
        name, code = ("Ctrl-C", 130) if isinstance(stop, KeyboardInterrupt) else ("SIGTERM", 143)
        log.error(
            "stopped by %s: files already written are complete and intact; run the same "
            "command again to resume (training) or redo the rest",
            name,
        )
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def progress(iterable: Iterable, enabled: bool = True, **kwargs: Any) -> tqdm:
    """tqdm over `iterable`, shown only on a terminal and when `enabled` (`--no-progress` and
    ranks other than 0 pass False), so redirected output holds log lines, not bar escapes."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)  # None: only on a tty


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


def loader_workers(requested: int | None, device: torch.device, evaluation: bool = False) -> int:
    """DataLoader worker processes: `--num_workers`, else for training 4 on CUDA and 0 on CPU
    (as before: a worker count changes which augmentation stream a sample meets), and for
    evaluation from the device and this process's cores: on CUDA all but one, up to 16 (a 900 px
    PNG takes about 28 ms of a core to decode and resize, and ViT-L at 518 px at 40% of an H200's
    bf16 peak scores about 390 images/s: 11 cores' worth); on a CPU, whose cores the model's
    matrix products already use, one per 8 cores (none below 8)."""
    if requested is not None:
        return requested
    if not evaluation:
        return 4 if device.type == "cuda" else 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device.type == "cuda":
        return max(1, min(16, cores - 1))
    return cores // 8


def rng_state() -> dict:
    """Python, numpy and torch RNG states, for exact resumes, as tensors and plain values (a
    checkpoint holding them loads with `weights_only=True`)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (also the numpy tuple of older checkpoints)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Mixed precision


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA with bf16, a CPU with AVX512-bf16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes: VmHWM from /proc (Linux), else ru_maxrss.
    A process's ru_maxrss also counts the memory of the process it was forked from (Linux keeps
    the high-water mark of the address space that exec replaced), so a child of a large parent
    reports the parent's size; VmHWM is this address space's own."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_kind() -> str:
    """The CPU's vector capability and its native bf16/AMX, which decide the kernels and whether
    autocast pays, e.g. `AVX2, bf16 emulated, no AMX` (printed beside benchmark rows)."""
    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "bf16 emulated"
    amx = "AMX" if torch.cpu._is_amx_tile_supported() else "no AMX"
    return f"{torch.backends.cpu.get_cpu_capability()}, {bf16}, {amx}"


def resolve_amp(amp: str, device: torch.device) -> str:
    """`--amp auto` -> bf16 where the device computes it natively, else none (fp32); an explicit
    bf16 or fp16 on a CPU that would only emulate it logs one warning (it is slower than fp32)."""
    if amp not in AMP_CHOICES:
        raise ConfigError(f"unknown --amp {amp!r}; use one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    emulated = (amp == "bf16" and not native_bf16(device)) or (
        amp == "fp16" and not torch.cpu._is_amx_fp16_supported()
    )
    if device.type == "cpu" and emulated and amp not in _WARNED_AMP:
        _WARNED_AMP.add(amp)  # once per process
        logger.warning(
            "--amp %s on a CPU without native %s (%s): autocast emulates it, which "
            "made ViT-L inference 6.5x slower than fp32 on such a CPU (an AVX2-only EPYC, README "
            "Performance); use --amp none or --amp auto",
            amp,
            amp,
            cpu_kind(),
        )
    return amp


def autocast(device: torch.device, amp: str):
    """`torch.autocast` for `--amp bf16|fp16`, a no-op context for `none`.

    Maps, losses and metrics are computed in float32 whatever this says (they cast explicitly).
    """
    if amp not in AMP_DTYPES:
        raise ConfigError(f"unknown --amp {amp!r}; use one of {sorted(AMP_DTYPES)}")
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def float32_island(device: torch.device | str):
    """Autocast off, whatever the caller entered: the one way maps, losses, scores and metrics
    stay float32 under `--amp` (the code inside casts its inputs with `.float()`)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling, needed only for fp16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
