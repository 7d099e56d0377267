"""Hostile files for `predict.py score` (issue 27): an image that declares 169 MP, names of 255
bytes and names that are not UTF-8, a file deleted while the folder is scored, a picture that
cannot be written. One file costs its own row, never the run, and what was scored before a
failure is kept."""

from __future__ import annotations

import csv
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import predict
from datasets.folder import PREVIEW_SIDE
from datasets.preprocessing import read_image
from tests import test_predict
from tests.test_hostile_inputs import files_under
from tests.test_predict import _normal_image
from utils.core import checkpoint as storage
from utils.core.names import NAME_BYTES, printable
from utils.deploy import score

REPO = Path(__file__).resolve().parents[1]
HUGE_SIDE = 13000  # 169 MP: under PIL's bomb limit (179 MP), over the default budget (64 MP)
MEMORY_LIMIT = 1.5e9  # bytes: the peak RSS of a whole score run with overlays
# Runs argv[1:] as its child and prints the child's ru_maxrss (KiB) last; exits with its status.
PEAK_LAUNCHER = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)
checkpoint, calibrated = test_predict.checkpoint, test_predict.calibrated  # its trained run


def score_argv(save_path: Path, folder: Path, out: Path, *flags: str) -> list[str]:
    return ["score", "--checkpoint", str(save_path), "--input", str(folder), "--out", str(out),
            "--device", "cpu", *flags]  # fmt: skip


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def huge_folder(calibrated, tmp_path_factory):
    """Two normal images and a constant 13000 x 13000 grayscale PNG (about 200 KB)."""
    folder = tmp_path_factory.mktemp("huge") / "incoming"
    folder.mkdir()
    image = _normal_image(calibrated[0])
    image.save(folder / "a.png")
    image.save(folder / "c.png")
    Image.new("L", (HUGE_SIDE, HUGE_SIDE), 128).save(folder / "b_huge.png")
    return folder


def test_an_image_over_the_pixel_budget_is_an_error_row_naming_the_flag(
    calibrated, huge_folder, tmp_path
):
    out = tmp_path / "out"
    assert predict.main(score_argv(calibrated[1], huge_folder, out)) == 0
    rows = read_rows(out)
    assert sorted(rows) == ["a.png", "b_huge.png", "c.png"]
    error = rows["b_huge.png"]["error"]
    assert "declares 13000 x 13000 pixels (169 MP)" in error and "--max_image_pixels" in error
    assert rows["b_huge.png"]["image_score"] == ""
    assert not rows["a.png"]["error"] and not rows["c.png"]["error"]


def test_a_large_jpeg_is_decoded_reduced_to_within_the_budget(calibrated, tmp_path, caplog):
    folder = tmp_path / "incoming"
    folder.mkdir()
    _normal_image(calibrated[0]).resize((800, 600)).save(folder / "big.jpg")
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        argv = score_argv(calibrated[1], folder, out, "--max_image_pixels", "200000")
        assert predict.main(argv) == 0
    assert "800 x 600 pixels decoded at 1/2 (400 x 300)" in caplog.text
    row = read_rows(out)["big.jpg"]
    assert not row["error"] and row["image_score"]
    assert Image.open(out / "overlays" / "big_overlay.png").size == (400, 300)


def test_scoring_a_169_mp_image_with_overlays_stays_under_1_5_gb(calibrated, huge_folder, tmp_path):
    """The budget raised above the image: the whole run (torch, the model, the image) peaks
    under 1.5 GB, its ru_maxrss as reported to a small launcher (`PEAK_LAUNCHER`). Linux counts
    in a process's ru_maxrss the memory of the process it was forked from (the mm that exec
    replaces), so a child of pytest would report pytest's own size when that is larger; a real
    interpreter, not the fork server, for the same reason."""
    out = tmp_path / "out"
    before = files_under(tmp_path)
    argv = score_argv(calibrated[1], huge_folder, out, "--max_image_pixels", "200000000")
    command = [sys.executable, "predict.py", *argv, "--num_workers", "0"]
    done = subprocess.run(
        [sys.executable, "-S", "-c", PEAK_LAUNCHER, *command],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.split()[-1]) * 1024  # KiB on Linux
    print(f"peak RSS of predict.py score on a {HUGE_SIDE}^2 PNG: {peak / 1e9:.2f} GB")
    assert peak < MEMORY_LIMIT, f"{peak / 1e9:.2f} GB"
    rows = read_rows(out)
    assert all(not row["error"] and row["image_score"] for row in rows.values()), rows
    overlay = Image.open(out / "overlays" / "b_huge_overlay.png")
    assert overlay.size == (PREVIEW_SIDE, PREVIEW_SIDE)
    assert all(path.is_relative_to(out) for path in files_under(tmp_path) - before)


@pytest.mark.parametrize("char", ["a", "é", "가"])
def test_a_255_byte_file_name_is_scored_and_its_pictures_are_named_by_a_hash(
    char, calibrated, tmp_path
):
    folder = tmp_path / "incoming"
    folder.mkdir()
    stem = char * ((NAME_BYTES - 4) // len(char.encode()))
    names = [f"{stem}.png", f"{stem[:-1]}x.png", "plain.png"]
    for name in names:
        _normal_image(calibrated[0]).save(folder / name)
    out = tmp_path / "out"
    assert predict.main(score_argv(calibrated[1], folder, out)) == 0
    rows = read_rows(out)
    assert sorted(rows) == sorted(names)
    assert all(not row["error"] for row in rows.values()), rows
    overlays = sorted(path.name for path in (out / "overlays").iterdir())
    assert len(overlays) == 3 and "plain_overlay.png" in overlays
    assert all(len(os.fsencode(name)) <= NAME_BYTES for name in overlays)


def test_a_name_that_is_not_utf8_is_written_with_its_bytes_escaped(calibrated, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    odd = os.fsdecode(b"bad\xff\xfe.png")
    for name in (odd, "good.png"):
        _normal_image(calibrated[0]).save(folder / name)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"file,label\nbad\xff\xfe.png,1\ngood.png,0\n")  # the raw bytes
    out = tmp_path / "out"
    assert predict.main(score_argv(calibrated[1], folder, out, "--labels", str(labels))) == 0
    rows = read_rows(out)  # valid UTF-8
    assert sorted(rows) == ["bad\\xff\\xfe.png", "good.png"]
    assert printable(odd) == "bad\\xff\\xfe.png"
    assert all(not row["error"] for row in rows.values())
    report = (out / "report.json").read_text(encoding="utf-8")
    assert '"unlabelled_scored": 0' in report
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "bad\\xff\\xfe.png" in page
    assert (out / "overlays" / "bad\\xff\\xfe_overlay.png").is_file()


def three_images(calibrated, tmp_path: Path) -> Path:
    """`incoming/` with normal images a.png, b.png, c.png (scored in that order)."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        _normal_image(calibrated[0]).save(folder / name)
    return folder


def test_a_file_deleted_after_listing_is_an_error_row(calibrated, tmp_path, monkeypatch):
    folder = three_images(calibrated, tmp_path)
    listed = score.list_images

    def list_then_delete(path):
        files = listed(path)
        (folder / "b.png").unlink()  # gone between listing and reading
        return files

    monkeypatch.setattr(score, "list_images", list_then_delete)
    out = tmp_path / "out"
    assert predict.main(score_argv(calibrated[1], folder, out)) == 0
    rows = read_rows(out)
    assert sorted(rows) == ["a.png", "b.png", "c.png"]
    assert "it is gone (deleted or moved since it was listed)" in rows["b.png"]["error"]
    assert not rows["a.png"]["error"] and not rows["c.png"]["error"]


def _failing_save(fail_on: str, code: int):
    """atomic_write that fails with `code` for paths containing `fail_on`."""
    original = storage.atomic_write

    def atomic_write(path, write, mode="wb"):
        if fail_on in str(path):
            cause = OSError(code, os.strerror(code))
            raise storage.storage_error(Path(path), cause) from cause
        original(path, write, mode)

    return atomic_write


def test_a_picture_that_cannot_be_written_is_that_files_error_row(
    calibrated, tmp_path, monkeypatch
):
    folder = three_images(calibrated, tmp_path)
    monkeypatch.setattr(score, "atomic_write", _failing_save("b_overlay", errno.ENAMETOOLONG))
    out = tmp_path / "out"
    assert predict.main(score_argv(calibrated[1], folder, out)) == 0
    rows = read_rows(out)
    error = rows["b.png"]["error"]
    assert "pictures not written" in error and "File name too long" in error
    assert "shorten it" in error and "free space" not in error
    assert rows["a.png"]["image_score"] and rows["c.png"]["image_score"]


def test_a_full_disk_late_in_a_run_keeps_the_rows_before(
    calibrated, tmp_path, monkeypatch, one_line_error
):
    folder = three_images(calibrated, tmp_path)
    monkeypatch.setattr(score, "atomic_write", _failing_save("c_overlay", errno.ENOSPC))
    out = tmp_path / "out"
    before = files_under(tmp_path)
    assert predict.main(score_argv(calibrated[1], folder, out, "--batch_size", "1")) == 2
    message = one_line_error()
    assert "No space left on device" in message and "free space" in message
    assert score.PARTIAL_SCORES in message
    with open(out / score.PARTIAL_SCORES, newline="", encoding="utf-8") as handle:
        kept = [row["file"] for row in csv.DictReader(handle)]
    assert kept == ["a.png", "b.png"]
    assert all(path.is_relative_to(out) for path in files_under(tmp_path) - before)


def test_a_budget_below_one_pixel_is_one_line(calibrated, huge_folder, tmp_path, one_line_error):
    argv = score_argv(calibrated[1], huge_folder, tmp_path / "out", "--max_image_pixels", "0")
    assert predict.main(argv) == 2
    assert "max_image_pixels" in one_line_error()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["1", "L", "P", "I;16", "RGBA", "RGB"])
def test_reduce_above_reduces_every_mode_before_its_rgb_conversion(mode, tmp_path):
    path = tmp_path / f"x{mode.replace(';', '')}.png"
    Image.new(mode, (101, 50), 1).save(path)
    read = read_image(path, reduce_above=1000)
    assert read.mode == "RGB" and read.size == (34, 17)  # factor 3: 34 x 17 <= 1000 < 51 x 25
    assert read_image(path).size == (101, 50)


def test_labels_name_a_file_that_is_not_utf8_by_its_escaped_form(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nsub/bad\\xff.png,1\n", encoding="utf-8")
    name = printable(os.fsdecode(b"sub/bad\xff.png"))
    assert score.read_labels(labels, [name, "sub/good.png"]) == {name: 1}


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.ENOSPC, "free space on the disk"),
        (errno.EDQUOT, "free space within your disk quota"),
        (errno.ENAMETOOLONG, "too long for the file system: shorten it"),
        (errno.EIO, "fix that or choose another folder"),
    ],
)
def test_a_failed_write_names_its_cause_and_only_a_full_disk_says_free_space(code, hint):
    cause = OSError(code, os.strerror(code))
    try:
        raise storage.storage_error(Path("out/x.png"), cause) from cause
    except storage.StorageError as error:
        message, full = str(error), storage.out_of_space(error)
    assert os.strerror(code) in message and hint in message
    assert ("free space" in message) == full == (code in (errno.ENOSPC, errno.EDQUOT))
