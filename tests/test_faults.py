"""Faults end in one line, a non-zero exit and nothing lost: diverging losses, a full disk (a
patched writer raising ENOSPC, and a real file-size limit), Ctrl-C and SIGTERM, two trainings
into one folder, read-only output folders, and kill -9 at random points during training."""

from __future__ import annotations

import errno
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import predict
import test as test_script
import train
from models.feclip import FEClip
from models.registry import find_checkpoint
from utils.core import checkpoint
from utils.core.errors import TrainingDiverged
from utils.core.runtime import grad_scaler, progress, run_script
from utils.engine import job, training
from utils.engine.distributed import Distributed
from utils.engine.training import training_step
from utils.evaluation import evaluate
from utils.inference.predictor import AnomalyPredictor

ROOT = Path(__file__).resolve().parents[1]
FECLIP_RUN = [
    "--model", "feclip", "--device", "cpu", "--training_mode", "few_shot", "--shot", "4",
    "--batch_size", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, synthetic_root):
    root = tmp_path_factory.mktemp("faults") / "Synthetic"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.fixture(scope="module")
def trained_once(data_root, tmp_path_factory):
    save_path = tmp_path_factory.mktemp("good") / "run"
    argv = [*FECLIP_RUN, "--data_root", str(data_root), "--save_path", str(save_path)]
    assert train.main([*argv, "--epochs", "1"]) == 0
    return save_path


@pytest.fixture
def good_run(data_root, trained_once, tmp_path):
    """A private copy of an FE-CLIP run of one epoch: the files a fault must leave intact."""
    save_path = tmp_path / "run"
    shutil.copytree(trained_once, save_path)
    argv = [*FECLIP_RUN, "--data_root", str(data_root), "--save_path", str(save_path)]
    return argv, save_path


def intact(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    checkpoint.load_checkpoint(path) if path.suffix == ".pth" else None
    assert not list(path.parent.glob(checkpoint.TEMPORARY_GLOB)), "a temporary file was left"


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(
    good_run, monkeypatch, one_line_error
):
    argv, save_path = good_run
    before = (save_path / "feclip.pth").read_bytes()

    def nan_loss(self, output, batch):
        return {"loss": output.image_logits.sum() * float("nan")}

    monkeypatch.setattr(FEClip, "loss", nan_loss)
    assert train.main([*argv, "--epochs", "2"]) == 2
    message = one_line_error()
    assert "the loss is nan at epoch 2/2, step 1/" in message
    assert "feclip.pth (epoch 1) is kept" in message and "--lr" in message
    assert "--amp none" in message
    intact(save_path / "feclip.pth", before)
    assert not (save_path / "feclip_2.pth").exists()


def test_a_huge_learning_rate_is_one_line(data_root, tmp_path, one_line_error):
    argv = [*FECLIP_RUN, "--data_root", str(data_root), "--save_path", str(tmp_path / "run")]
    assert train.main([*argv, "--lr", "1e10", "--epochs", "2"]) == 2
    assert "the loss is nan" in one_line_error() and not (tmp_path / "run" / "feclip.pth").exists()


class _Overflowing(torch.nn.Module):
    """A finite loss whose gradients are always infinite (fp16 overflow at every step)."""

    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.weight.register_hook(lambda grad: grad * float("inf"))

    def forward(self, batch):
        return self.weight * batch["x"]

    def loss(self, output, batch):
        return {"loss": output.sum()}


def test_fp16_overflow_at_every_step_stops_beyond_the_scalers_skipping():
    model = _Overflowing()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = grad_scaler(torch.device("cpu"), "fp16")
    assert scaler.is_enabled()
    scaler._init_scale = 2.0  # the default 65536 halves 17 times before it falls below 1
    with pytest.raises(TrainingDiverged, match="fp16 gradients overflow"):
        for _ in range(3):
            batch = {"x": torch.ones(1)}
            training_step(model, model, batch, optimizer, scaler, "fp16", Distributed())


def test_non_finite_checkpoints_are_refused_by_evaluation_and_calibration(
    good_run, data_root, one_line_error, caplog
):
    _, save_path = good_run
    evaluated = find_checkpoint(save_path)[1]
    payload = checkpoint.load_checkpoint(evaluated)
    payload["feclip"]["fc_patch.weight"][0, 0] = float("nan")
    checkpoint.save_checkpoint(evaluated, payload)
    argv = ["--save_path", str(save_path), "--data_root", str(data_root), "--device", "cpu"]
    assert test_script.main(argv) == 2
    assert "non-finite values (feclip.fc_patch.weight)" in one_line_error()
    caplog.clear()
    normal = data_root / "tile" / "train" / "good"
    argv = ["calibrate", "--checkpoint", str(save_path), "--normal_dir", str(normal)]
    assert predict.main([*argv, "--device", "cpu"]) == 2
    assert "non-finite values" in one_line_error()


def test_non_finite_scores_are_refused_by_calibration(
    good_run, data_root, monkeypatch, one_line_error
):
    _, save_path = good_run
    original = AnomalyPredictor.predict

    def nan_scores(self, images, class_names, valid_mask=None):
        output = original(self, images, class_names, valid_mask)
        return output._replace(image_score=output.image_score * float("nan"))

    monkeypatch.setattr(AnomalyPredictor, "predict", nan_scores)
    normal = data_root / "tile" / "train" / "good"
    argv = ["calibrate", "--checkpoint", str(save_path), "--normal_dir", str(normal)]
    assert predict.main([*argv, "--device", "cpu"]) == 2
    assert "non-finite scores for 8 of 8 normal images" in one_line_error()
    assert not (save_path / "calibration.json").exists()


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_save(good_run, monkeypatch, one_line_error):
    argv, save_path = good_run
    before = (save_path / "feclip.pth").read_bytes()
    monkeypatch.setattr(torch, "save", enospc)
    assert train.main([*argv, "--epochs", "2"]) == 2
    message = one_line_error()
    assert "cannot write" in message and "No space left on device" in message
    intact(save_path / "feclip.pth", before)


def test_a_full_disk_while_writing_results_calibration_and_overlays(
    good_run, data_root, tmp_path, monkeypatch, one_line_error, caplog
):
    _, save_path = good_run
    common = ["--save_path", str(save_path), "--data_root", str(data_root), "--device", "cpu"]
    normal = data_root / "tile" / "train" / "good"
    calibrate = ["calibrate", "--checkpoint", str(save_path), "--normal_dir", str(normal)]
    out = tmp_path / "scored"
    score = ["score", "--checkpoint", str(save_path), "--input", str(normal), "--out", str(out)]
    assert test_script.main(common) == 0
    assert predict.main([*calibrate, "--device", "cpu"]) == 0
    assert predict.main([*score, "--device", "cpu"]) == 0
    files = [
        save_path / "results_Synthetic.json",
        save_path / "calibration.json",
        next((out / "overlays").glob("*.png")),
    ]
    before = [path.read_bytes() for path in files]
    monkeypatch.setattr(checkpoint.os, "fsync", enospc)  # every atomic write ends in fsync
    for run, argv in (
        (test_script.main, common),
        (predict.main, [*calibrate, "--device", "cpu"]),
        (predict.main, [*score, "--device", "cpu"]),
    ):
        caplog.clear()
        assert run(argv) == 2
        assert "No space left on device" in one_line_error()
    for path, content in zip(files, before, strict=True):
        intact(path, content)


def environment() -> dict[str, str]:
    """The test process's thread count, so epochs trained in a subprocess are bit-equal."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def run_train(
    python: Path, argv: list[str], limit: int | None = None, **kwargs
) -> subprocess.CompletedProcess:
    def preexec():
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [python, ROOT / "train.py", *argv]
    return subprocess.run(
        command,
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        **kwargs,
    )


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-2000:]
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_a_real_file_size_limit_during_a_checkpoint_save(python, good_run):
    argv, save_path = good_run
    before = (save_path / "feclip.pth").read_bytes()
    completed = run_train(python, [*argv, "--epochs", "2"], limit=len(before) // 2)
    assert completed.returncode == 2
    (line,) = error_lines(completed.stderr)
    assert (
        "cannot write" in line and "file-size limit" in line and "previous file is intact" in line
    )
    intact(save_path / "feclip.pth", before)


def test_a_real_read_only_folder_is_refused_before_any_work(
    data_root, trained_once, tmp_path, one_line_error, caplog
):
    folder = tmp_path / "readonly"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)])
    if mounted.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("no mount here, and root writes into a chmod-ed folder anyway")
        folder.chmod(0o555)
    try:
        argv = [*FECLIP_RUN, "--data_root", str(data_root), "--save_path", str(folder / "run")]
        assert train.main(argv) == 2
        assert "cannot write to" in one_line_error() and "--save_path" in one_line_error()
        caplog.clear()
        argv = ["--save_path", str(trained_once), "--data_root", str(data_root), "--device", "cpu"]
        assert test_script.main([*argv, "--results_dir", str(folder / "eval")]) == 2
        assert "cannot write to" in one_line_error() and "--results_dir" in one_line_error()
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(folder)], check=True)


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    start = time.monotonic()
    while text not in (path.read_text() if path.is_file() else ""):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - start < timeout, f"no {text!r} in {path}"
        time.sleep(0.05)


def popen_train(python: Path, argv: list[str]) -> subprocess.Popen:
    command = [python, ROOT / "train.py", *argv]
    return subprocess.Popen(command, cwd=ROOT, env=environment(), stderr=subprocess.PIPE, text=True)


@pytest.fixture
def terminal_sigint():
    """SIGINT raising KeyboardInterrupt, as at a terminal, even when this test run was started
    with SIGINT ignored (a shell ignores it for its background jobs, and Python keeps that)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_training_is_one_line_and_resumable(
    good_run, monkeypatch, one_line_error, terminal_sigint
):
    """A real SIGINT to this process, right after epoch 2's checkpoint is written."""
    argv, save_path = good_run
    save_stage = training.save_stage

    def save_then_interrupt(model, stage, epoch, *args):
        best = save_stage(model, stage, epoch, *args)
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # Python raises KeyboardInterrupt here
        return best

    monkeypatch.setattr(training, "save_stage", save_then_interrupt)
    assert train.main([*argv, "--epochs", "30"]) == 130
    message = one_line_error()
    assert message.startswith("stopped by Ctrl-C") and "run the same command again" in message
    assert checkpoint.load_checkpoint(save_path / "feclip.pth")["epoch"] == 2
    assert not (save_path / "train.lock").exists()  # released however the run ends
    monkeypatch.setattr(training, "save_stage", save_stage)
    assert train.main([*argv, "--epochs", "3"]) == 0
    assert checkpoint.load_checkpoint(save_path / "feclip.pth")["epoch"] == 3


def test_a_second_training_into_the_same_folder_is_refused(good_run, one_line_error, caplog):
    argv, save_path = good_run
    lock = save_path / "train.lock"
    lock.write_text(f"{os.getpid()} {os.uname().nodename}\n")  # a live process holds it
    assert train.main([*argv, "--epochs", "2"]) == 2
    assert f"another training (PID {os.getpid()}" in one_line_error()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(f"{gone.stdout.strip()} {os.uname().nodename}\n")  # its process is gone
    caplog.clear()
    assert train.main([*argv, "--epochs", "2"]) == 0
    assert "taking over the stale lock" in caplog.text and not lock.exists()


def test_kill_9_at_random_points_leaves_loadable_checkpoints_and_the_same_final_weights(
    python, data_root, tmp_path
):
    """3 kill points by default; KILL_POINTS=10 python -m pytest -k kill_9 for the full loop."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    argv = [*FECLIP_RUN, "--data_root", str(data_root), "--epochs", "6"]
    assert train.main([*argv, "--save_path", str(reference)]) == 0
    rng = random.Random(0)
    for _ in range(int(os.environ.get("KILL_POINTS", "3"))):
        process = popen_train(python, [*argv, "--save_path", str(killed)])
        wait_for(killed / "train_feclip.log", "training feclip", process)
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.communicate()
        for path in killed.glob("*.pth"):
            checkpoint.load_checkpoint(path)  # complete, whatever the moment of the kill
    assert train.main([*argv, "--save_path", str(killed)]) == 0
    expected = checkpoint.load_checkpoint(reference / "feclip.pth")
    got = checkpoint.load_checkpoint(killed / "feclip.pth")
    assert got["epoch"] == expected["epoch"] == 6
    for key, value in expected["feclip"].items():
        assert torch.equal(got["feclip"][key], value), key


def test_ctrl_c_during_evaluation_is_one_line_and_keeps_earlier_results(
    good_run, data_root, monkeypatch, one_line_error
):
    _, save_path = good_run
    argv = ["--save_path", str(save_path), "--data_root", str(data_root), "--device", "cpu"]
    assert test_script.main(argv) == 0
    before = (save_path / "results_Synthetic.json").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "predict_class", interrupted)
    assert test_script.main(argv) == 130
    assert one_line_error().startswith("stopped by Ctrl-C")
    intact(save_path / "results_Synthetic.json", before)


def test_sigterm_is_one_line_like_ctrl_c(caplog):
    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here

    assert run_script(body, logging.getLogger("test")) == 143
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage().startswith("stopped by SIGTERM") and "Traceback" not in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


# Provenance (issue 19): a run's config and checkpoints say what produced them.


def test_a_failed_run_keeps_the_config_of_the_run_in_its_folder(good_run, one_line_error):
    argv, save_path = good_run
    before = (save_path / "config.yaml").read_bytes()
    bad_data = ["--dataset", "MVTec", "--data_root", "/nonexistent/mvtec", "--epochs", "2"]
    assert train.main([*argv, *bad_data]) == 2
    assert "does not exist" in one_line_error()
    assert (save_path / "config.yaml").read_bytes() == before


@pytest.mark.parametrize(("flag", "value", "saved"), [("--seed", "7", "42"), ("--shot", "8", "4")])
def test_resuming_with_a_setting_that_alters_the_run_is_refused(
    good_run, one_line_error, flag, value, saved
):
    argv, save_path = good_run
    before = (save_path / "feclip.pth").read_bytes()
    assert train.main([*argv, flag, value, "--epochs", "2"]) == 2
    message = one_line_error()
    assert f"{flag[2:]}={int(saved)!r}, not {int(value)!r}" in message
    assert f"pass {flag} {saved} or a new --save_path" in message
    intact(save_path / "feclip.pth", before)


def test_stale_temporary_files_of_killed_saves_are_removed(good_run, caplog):
    argv, save_path = good_run
    stale = save_path / ".feclip.pth.k9x2.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train.main([*argv, "--epochs", "1"]) == 0
    assert not stale.exists() and "removed 1 temporary files" in caplog.text


def test_offline_default_weights_are_one_line_saying_how_to_place_them(
    data_root, tmp_path, monkeypatch, one_line_error
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    argv = ["--data_root", str(data_root), "--save_path", str(tmp_path / "run")]
    assert train.main([*argv, "--model_name", "ViT-B-32", "--device", "cpu"]) == 2
    message = one_line_error()
    assert "cannot get the 'openai' weights of ViT-B-32" in message
    assert "HF_HUB_OFFLINE=1" in message and "--pretrained /path/to/" in message


def test_progress_bars_only_on_a_terminal_or_never_with_no_progress(good_run, capsys):
    argv, _ = good_run
    assert train.main([*argv, "--epochs", "2"]) == 0  # pytest's stderr is not a terminal
    assert "it/s" not in capsys.readouterr().err
    assert progress(range(3), enabled=False).disable
    assert progress(range(3), quiet=True).disable
    assert job.build_parser(FEClip).parse_args(["--no_progress"]).progress is False
