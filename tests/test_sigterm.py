"""SIGTERM to `python -m pytest` ends every process the tests started (tests/reaper.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/environ").is_file(), reason="finds the processes through /proc"
)


def marked_processes(mark: bytes) -> list[str]:
    """'PID command' of each live (not zombie) process whose environment holds `mark`."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark not in environ.read_bytes().split(b"\0"):
                continue
            state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, UnicodeDecodeError):
            continue  # ended meanwhile, or not ours to read
        if state not in ("Z", "X"):
            found.append(f"{environ.parent.name} {' '.join(command.split())[:120]}")
    return found


def test_sigterm_to_pytest_leaves_no_process_behind(tmp_path):
    ready, output = tmp_path / "ready", tmp_path / "output.txt"
    run_id = uuid.uuid4().hex  # inherited by every process of the inner run, found in /proc
    env = {**os.environ, "SIGTERM_READY": str(ready), "SIGTERM_TEST_RUN": run_id}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += [f"--basetemp={tmp_path / 'inner'}", "tests/sigterm_target.py"]
    mark = f"SIGTERM_TEST_RUN={run_id}".encode()
    with output.open("wb") as log:
        run = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert run.poll() is None, output.read_text()[-3000:]
            assert time.monotonic() < deadline, "the inner run never got its processes started"
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 3
        while (left := marked_processes(mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        run.kill()
        run.wait()
        for process in marked_processes(mark):  # what a failure left: end it here
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(process.split()[0]), signal.SIGKILL)
    assert not left, "still running after pytest ended:\n" + "\n".join(left)
