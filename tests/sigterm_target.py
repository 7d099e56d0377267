"""Run only by tests/test_sigterm.py, as `python -m pytest tests/sigterm_target.py` (the name is
not collected otherwise): starts the kinds of process a test run leaves behind when pytest is
killed, touches $SIGTERM_READY once they all run, then waits to be terminated."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

WAIT_S = 120  # longer than the SIGTERM test takes, short enough that a leak ends on its own

# A script whose DataLoader workers (forked, as on Linux by default) wait on slow items.
LOADER = f"""
import sys, time
from torch.utils.data import DataLoader, Dataset

class Slow(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        time.sleep(0.1)
        return index

batches = iter(DataLoader(Slow(), num_workers=2))
next(batches)
open(sys.argv[1], "w").close()
time.sleep({WAIT_S})
"""


def wait() -> None:
    time.sleep(WAIT_S)


def test_start_workers_and_wait(tmp_path: Path) -> None:
    loader_ready = tmp_path / "loader_ready"
    loader = subprocess.Popen([sys.executable, "-c", LOADER, str(loader_ready)])
    # multiprocessing's fork server and a child it forks (not a child of pytest).
    multiprocessing.get_context("forkserver").Process(target=wait, daemon=True).start()
    deadline = time.monotonic() + 60
    while not loader_ready.exists():
        assert loader.poll() is None and time.monotonic() < deadline, "the loader did not start"
        time.sleep(0.05)
    Path(os.environ["SIGTERM_READY"]).touch()
    wait()
