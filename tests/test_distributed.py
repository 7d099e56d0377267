"""torchrun with 2 CPU processes (gloo): both stages run, stage 2 equals a single-process run."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import torch

from utils.core.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str | Path]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def image_losses(save_path: Path) -> list[float]:
    text = (save_path / "train.log").read_text()
    return [float(loss) for loss in re.findall(r"image epoch \d+/\d+: loss ([\d.]+)", text)]


def test_torchrun_matches_single_process_with_the_same_global_batch(
    python, synthetic_root, tmp_path
):
    data_root = tmp_path / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    common = [
        "train.py",
        "--data_root",
        str(data_root),
        "--device",
        "cpu",
        "--no-augment",
        "--shot",
        "8",
        "--text_epoch",
        "1",
        "--image_epoch",
        "2",
        "--text_batch_size",
        "8",
        "--image_batch_size",
        "4",
        "--num_workers",
        "0",
    ]
    distributed, single = tmp_path / "ddp", tmp_path / "single"
    run(
        [
            python,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            *common,
            "--save_path",
            str(distributed),
        ]
    )

    # Only rank 0 wrote: one log line per epoch, one set of files.
    assert len(image_losses(distributed)) == 2
    assert (distributed / "train.log").read_text().count("text epoch 1/1") == 1
    names = {path.name for path in distributed.iterdir()}
    assert names == {
        "config.yaml",
        "train.log",
        "text_adapter.pth",
        "image_adapter.pth",
        "image_adapter_1.pth",
        "image_adapter_2.pth",
    }

    # Stage 1's batch-level terms depend on the per-rank batch, so stage 2 is compared from the
    # same stage-1 checkpoint: the single run resumes after stage 1.
    single.mkdir()
    shutil.copy(distributed / "text_adapter.pth", single / "text_adapter.pth")
    run([python, *common, "--save_path", str(single)])

    expected, got = image_losses(single), image_losses(distributed)
    assert len(expected) == 2
    for a, b in zip(expected, got, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (expected, got)
    weights_single = load_checkpoint(single / "image_adapter.pth")["image_adapter"]
    weights_ddp = load_checkpoint(distributed / "image_adapter.pth")["image_adapter"]
    for key, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[key], value, atol=1e-5, rtol=1e-4)
