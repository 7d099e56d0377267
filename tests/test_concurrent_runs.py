"""Concurrent runs and a read-only working directory: a second `predict.py score` into one --out
is refused while the first holds its lock, a stale lock is taken over; `test.py --all_epochs` on a
run that still trains says so; train.py, test.py and predict.py from a read-only working
directory (their default data/ and ckpt/ are relative) end in one line naming the flag to pass,
rc 2, and write nothing."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import predict
import test as test_script
import train
from datasets.synthetic import generate
from tests import test_hostile_inputs, test_predict
from tests.test_hostile_inputs import FECLIP_RUN, files_under
from tests.test_predict import CLASS
from utils.core.checkpoint import TRAIN_LOCK, folder_lock, held
from utils.core.errors import ConfigError, StorageError

# Module fixtures shared by name: a trained tiny FE-CLIP; a tiny AA-CLIP and its calibration.
data_root, trained = test_hostile_inputs.data_root, test_hostile_inputs.trained
checkpoint, calibrated = test_predict.checkpoint, test_predict.calibrated


def dead_pid() -> int:
    """The PID of a process that has ended (a lock it held is stale)."""
    code = "import os; print(os.getpid())"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(done.stdout)


def contents(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in files_under(folder)}


# ---------------------------------------------------------------------------------------------
# The lock


def test_a_lock_is_held_by_a_live_process_and_stale_once_it_is_gone(tmp_path):
    lock = tmp_path / "x.lock"
    host = socket.gethostname()
    assert held(lock) is None  # no lock
    with folder_lock(tmp_path, "x.lock", "scoring", "--out") as path:
        assert path == lock and lock.read_text() == f"{os.getpid()} {host}\n"
        assert held(lock) == (os.getpid(), host)
        with pytest.raises(ConfigError, match=rf"another scoring \(PID {os.getpid()} on {host}\)"):
            with folder_lock(tmp_path, "x.lock", "scoring", "--out"):
                pass
        assert lock.is_file()  # the refused one leaves the holder's lock alone
    assert not lock.exists()
    lock.write_text(f"{dead_pid()} {host}\n")
    assert held(lock) is None  # its process is gone
    lock.write_text(f"{dead_pid()} another-host\n")
    assert held(lock) == (int(lock.read_text().split()[0]), "another-host")  # cannot tell: held
    lock.write_text("")
    assert held(lock) == (None, None)  # being written
    with pytest.raises(ConfigError, match=r"another scoring \(another run\).*delete"):
        with folder_lock(tmp_path, "x.lock", "scoring", "--out"):
            pass


def test_a_lock_is_released_however_the_run_ends(tmp_path):
    with pytest.raises(KeyboardInterrupt), folder_lock(tmp_path, "x.lock", "training", "--f"):
        raise KeyboardInterrupt
    assert not (tmp_path / "x.lock").exists()


def _hold_when(start: float, folder: str, queue: multiprocessing.Queue) -> None:
    """A run that starts at `start` (time.time) on a folder with a dead owner's lock: puts
    (took it, when it took it, when it let go), holding it 0.3 s."""
    time.sleep(max(0.0, start - time.time()))
    try:
        with folder_lock(Path(folder), "x.lock", "scoring", "--out"):
            taken = time.time()
            time.sleep(0.3)
            queue.put((True, taken, time.time()))
    except ConfigError:
        queue.put((False, 0.0, 0.0))


def test_two_runs_on_a_stale_lock_never_both_hold_it(tmp_path):
    """Issue 37, cause 6: runs that start together on a dead owner's lock; before, the second
    deleted the first one's fresh lock and both held it (31 of 100 trials)."""
    context = multiprocessing.get_context("fork")
    for trial in range(10):
        folder = tmp_path / str(trial)
        folder.mkdir()
        (folder / "x.lock").write_text(f"{dead_pid()} {socket.gethostname()}\n")
        queue = context.Queue()
        start = time.time() + 0.2
        runs = [
            context.Process(target=_hold_when, args=(start, str(folder), queue))
            for _ in range(3)
        ]
        for run in runs:
            run.start()
        held_times = [queue.get(timeout=30) for _ in runs]
        for run in runs:
            run.join(timeout=30)
        spans = sorted((taken, let_go) for took, taken, let_go in held_times if took)
        assert spans, "nobody took the stale lock"
        for (_, first_end), (second_start, _) in zip(spans, spans[1:], strict=False):
            assert second_start >= first_end, f"trial {trial}: two runs held the lock at once"
        assert not (folder / "x.lock").exists()


# ---------------------------------------------------------------------------------------------
# predict.py score


def score_argv(calibrated, out: Path) -> list[str]:
    root, save_path, _ = calibrated
    folder = root / CLASS / "test" / "blob"
    argv = ["score", "--checkpoint", str(save_path), "--input", str(folder), "--out", str(out)]
    return [*argv, "--device", "cpu"]


def test_a_second_score_into_one_out_is_refused_and_the_first_files_stay(
    calibrated,
    tmp_path,
    one_line_error,
    monkeypatch,
):
    out = tmp_path / "out"
    config_class, score = predict.COMMANDS["score"]
    lock = out / predict.SCORE_LOCK

    def score_holding_the_lock(*args):
        assert held(lock) == (os.getpid(), socket.gethostname())  # for the whole scoring
        return score(*args)

    monkeypatch.setitem(predict.COMMANDS, "score", (config_class, score_holding_the_lock))
    assert predict.main(score_argv(calibrated, out)) == 0
    assert not lock.exists()  # released, so not on the review page either
    assert all(predict.SCORE_LOCK not in page.read_text() for page in out.glob("*.html"))
    first = contents(out)
    assert out / "scores.csv" in first and out / "predict.log" in first

    with folder_lock(out, predict.SCORE_LOCK, "scoring", "--out"):  # the first run, still going
        assert predict.main(score_argv(calibrated, out)) == 2
        assert contents(out) == {**first, lock: lock.read_bytes()}  # not even predict.log
    message = one_line_error()
    assert f"another scoring (PID {os.getpid()}" in message and "choose another --out" in message
    assert contents(out) == first


def test_a_stale_score_lock_is_taken_over(calibrated, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / predict.SCORE_LOCK
    lock.write_text(f"{dead_pid()} {socket.gethostname()}\n")  # a killed score left it
    with caplog.at_level(logging.WARNING):
        assert predict.main(score_argv(calibrated, out)) == 0
    assert "taking over the stale lock" in caplog.text and not lock.exists()
    assert (out / "scores.csv").is_file()


# ---------------------------------------------------------------------------------------------
# test.py --all_epochs on a run that still trains


def test_all_epochs_on_a_run_that_still_trains_says_so_in_one_warning(
    trained,
    data_root,
    tmp_path,
    caplog,
):
    save_path = tmp_path / "feclip"
    shutil.copytree(trained, save_path)
    argv = ["--save_path", str(save_path), "--data_root", str(data_root), "--device", "cpu"]
    argv += ["--all_epochs"]
    lock = save_path / TRAIN_LOCK
    with caplog.at_level(logging.WARNING), folder_lock(save_path, TRAIN_LOCK, "training", "-"):
        assert test_script.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "still writing" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"PID {os.getpid()}" in warnings[0] and "only the epochs saved so far (1)" in warnings[0]

    caplog.clear()
    lock.write_text(f"{dead_pid()} {socket.gethostname()}\n")  # a killed training: not training
    with caplog.at_level(logging.WARNING):
        assert test_script.main(argv) == 0
    assert "still writing" not in caplog.text
    assert lock.is_file()  # test.py only reads the lock


# ---------------------------------------------------------------------------------------------
# A read-only working directory


# root's capabilities that let it write where permissions say no: dropped for the child run
DROP_CAPS = "-dac_override,-dac_read_search"


def permissions_bind(folder: Path) -> bool:
    """Whether this process is refused a file in the read-only `folder` (root is not)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return False
    except PermissionError:
        return True


@pytest.fixture
def read_only_cwd(tmp_path, monkeypatch):
    """An empty read-only working directory. Where permissions do not bind (root, as in CI),
    these tests are skipped here and run by `test_read_only_cwd_tests_run_as_root_without_its_
    privileges` in a child without root's file capabilities."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not permissions_bind(folder):
            pytest.skip("permissions do not bind for this user (root): run in a child instead")
        monkeypatch.chdir(folder)
        yield folder
    finally:
        folder.chmod(0o755)


def test_read_only_cwd_tests_run_as_root_without_its_privileges(tmp_path):
    """As root (CI), the read-only working directory tests run in a pytest child whose root has
    no CAP_DAC_OVERRIDE (util-linux `setpriv`), so permissions bind there; each must pass."""
    folder = tmp_path / "probe"
    folder.mkdir(mode=0o555)
    if permissions_bind(folder):
        pytest.skip("permissions bind for this user: the read-only tests ran directly")
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv (util-linux) to drop root's file capabilities")
    command = ["setpriv", f"--inh-caps={DROP_CAPS}", f"--bounding-set={DROP_CAPS}"]
    command += [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    command += ["-k", "read_only and not as_root", "--basetemp", str(tmp_path / "child")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary


def test_test_py_from_a_read_only_cwd_names_data_root_and_writes_nothing(
    read_only_cwd,
    trained,
    tmp_path,
    one_line_error,
):
    before, run = contents(tmp_path), contents(trained)
    assert test_script.main(["--save_path", str(trained), "--device", "cpu"]) == 2
    message = one_line_error()
    assert "cannot create data/Synthetic: the working directory is not writable" in message
    assert "pass --data_root to a writable folder" in message
    assert contents(tmp_path) == before and contents(trained) == run  # not even test.log


def test_train_py_from_a_read_only_cwd_names_the_flag_and_writes_nothing(
    read_only_cwd,
    data_root,
    tmp_path,
    one_line_error,
    caplog,
):
    before = contents(tmp_path)
    save_path = tmp_path / "new_run"
    assert train.main([*FECLIP_RUN, "--save_path", str(save_path)]) == 2  # default data root
    assert "pass --data_root to a writable folder" in one_line_error()
    assert not save_path.exists()
    caplog.clear()
    assert train.main([*FECLIP_RUN, "--data_root", str(data_root)]) == 2  # default save path
    assert "cannot write to ckpt/feclip" in one_line_error()
    assert "choose another --save_path" in one_line_error()
    assert contents(tmp_path) == before


def test_predict_py_from_a_read_only_cwd_names_the_flag_and_writes_nothing(
    read_only_cwd,
    trained,
    data_root,
    tmp_path,
    one_line_error,
    caplog,
):
    save_path, normal_dir = trained, data_root / CLASS / "train" / "good"
    before = contents(tmp_path)
    argv = ["score", "--checkpoint", str(save_path), "--input", str(normal_dir)]
    assert predict.main([*argv, "--out", "runs/incoming", "--device", "cpu"]) == 2
    assert "cannot write to runs/incoming" in (message := one_line_error())
    assert "choose another --out" in message
    caplog.clear()
    argv = ["calibrate", "--checkpoint", str(save_path), "--normal_dir", str(normal_dir)]
    assert predict.main([*argv, "--output", "calibration.json", "--device", "cpu"]) == 2
    assert "the working directory" in (message := one_line_error())
    assert "choose another --output" in message
    caplog.clear()
    argv = ["export", "--checkpoint", str(save_path), "--out", "deploy/x"]
    assert predict.main(argv) == 2
    assert "cannot write deploy/x" in (message := one_line_error()) and "not writable" in message
    assert contents(tmp_path) == before and not any(read_only_cwd.iterdir())


def test_generating_into_a_read_only_folder_is_a_storage_error(read_only_cwd):
    with pytest.raises(StorageError, match=r"cannot write the synthetic data set to .+--data_root"):
        generate(read_only_cwd / "Synthetic")
    assert not any(read_only_cwd.iterdir())
