"""Ends what a pytest run started once pytest is gone, however it ended (SIGTERM, kill -9, a
crash, or a normal exit that left something behind).

tests/conftest.py puts a mark unique to the run in pytest's environment, which every process the
tests start inherits (the fork server of tests/forkserver.py, the scripts it forks, their
DataLoader workers, torchrun's workers, multiprocessing's fork server and children), and starts

    python -S tests/reaper.py PYTEST_PID MARK

as pytest's child in a session of its own (Ctrl-C at the terminal does not reach it). When pytest
is gone, the reaper is reparented; it then stops every live process whose environment holds the
mark (again until no new one appears, so none forks away meanwhile) and kills them. Without it
they would run on under PID 1. Standard library only, and no torch: it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.2


def marked(mark: bytes) -> set[int]:
    """PIDs of the live processes, other than this one, whose environment holds `mark`."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                if mark in file.read().split(b"\0"):  # a zombie's reads empty
                    found.add(int(name))
        except OSError:
            continue  # ended meanwhile, or another user's
    return found


def end_marked(mark: bytes) -> None:
    """Stop every marked process until a scan finds no new one, then kill them all."""
    stopped: set[int] = set()
    while new := marked(mark) - stopped:
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass  # ended meanwhile
        stopped |= new
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(pytest_pid: int, mark: str) -> None:
    while os.getppid() == pytest_pid:
        time.sleep(POLL_S)
    end_marked(mark.encode())


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
