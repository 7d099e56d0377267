"""Shared fixtures: a tiny random CLIP and a generated synthetic data set, built once per run;
and a reaper that ends every process the tests started when pytest ends."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from datasets.synthetic import generate as generate_synthetic
from datasets.synthetic_mvtec_ad2 import generate as generate_mvtec_ad2
from models.backbone import tiny_clip as build_tiny_clip
from tests.forkserver import ForkServer

RUN_MARK = "CLIP_AD_PYTEST_RUN"
_REAPER = pytest.StashKey[subprocess.Popen]()


def pytest_configure(config: pytest.Config) -> None:
    """Mark every process the tests start (by an environment variable they all inherit) and
    start tests/reaper.py, which ends the marked processes once pytest is gone: killed by SIGTERM,
    they would otherwise run on under PID 1. Linux only: the reaper reads /proc."""
    if not Path("/proc/self/environ").is_file():
        return
    os.environ[RUN_MARK] = f"{os.getpid()}-{uuid.uuid4().hex}"
    config.stash[_REAPER] = subprocess.Popen(  # held, so that no warning says it still runs
        [
            sys.executable,
            "-S",
            str(Path(__file__).with_name("reaper.py")),
            str(os.getpid()),
            f"{RUN_MARK}={os.environ[RUN_MARK]}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C at the terminal reaches pytest, not the reaper
    )


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2 cores; more intra-op threads only add contention."""
    torch.set_num_threads(2)


@pytest.fixture
def tiny_clip():
    """A fresh frozen tiny CLIP (ViT-L-14's depth, widths 64) per test: cheap (< 0.1 s)."""
    model = build_tiny_clip(img_size=64)
    model.requires_grad_(False)
    return model.eval()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The synthetic MVTec-layout data set (3 classes, real masks), written once per run."""
    return generate_synthetic(tmp_path_factory.mktemp("data") / "Synthetic")


@pytest.fixture(scope="session")
def mvtec_ad2_root(tmp_path_factory):
    """A miniature MVTec AD 2 tree (3 classes of 1000-2500 px images, every split, real masks,
    the publisher's naming), written once per run (a few seconds). Tests that build records
    pass a `metadata_dir` of their own, so the shared tree stays as generated."""
    return generate_mvtec_ad2(tmp_path_factory.mktemp("data") / "MVTecAD2")


@pytest.fixture(scope="session")
def python(tmp_path_factory):
    """An executable to use in place of `sys.executable` for scripts run as separate processes:
    each call a fresh process forked with torch already imported (see tests/forkserver.py)."""
    with ForkServer(tmp_path_factory.mktemp("forkserver")) as executable:
        yield executable


@pytest.fixture
def one_line_error(caplog):
    """The single ERROR record a failed run logged: one line, no traceback anywhere."""

    def read() -> str:
        errors = [record for record in caplog.records if record.levelname == "ERROR"]
        assert len(errors) == 1
        message = errors[0].getMessage()
        assert "\n" not in message and "Traceback" not in caplog.text
        return message

    return read
