"""Atomic checkpoint writes and config mismatch messages."""

from __future__ import annotations

import pytest
import torch

from models.aaclip import AAClipConfig
from utils.core import checkpoint
from utils.core.config import check_architecture, from_mapping
from utils.core.errors import CheckpointError


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "image_adapter.pth"
    checkpoint.save_checkpoint(path, {"epoch": 1, "weight": torch.ones(3)})

    def crash(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"epoch": 2, "weight": torch.zeros(3)})
    monkeypatch.undo()
    payload = checkpoint.load_checkpoint(path)
    assert payload["epoch"] == 1
    assert torch.equal(payload["weight"], torch.ones(3))
    assert [entry.name for entry in tmp_path.iterdir()] == ["image_adapter.pth"]


def test_corrupt_and_missing_checkpoints_raise_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "nothing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load_checkpoint(bad)


def test_check_architecture_names_the_flag():
    saved = from_mapping(AAClipConfig, {"levels": [6, 12, 18, 24], "image_adapt_until": 6})
    check_architecture("x.pth", saved, AAClipConfig(block_indices=[5, 11, 17, 23]))
    with pytest.raises(CheckpointError, match="pass --image_adapt_until 6"):
        check_architecture("x.pth", saved, AAClipConfig(image_adapt_until=4))


def test_written_files_have_the_permissions_open_would_give(tmp_path):
    expected = 0o666 & ~checkpoint._umask()  # e.g. 0644 under the usual umask 022
    checkpoint.atomic_write(tmp_path / "results.json", lambda file: file.write("{}"), mode="w")
    checkpoint.save_checkpoint(tmp_path / "image_adapter.pth", {"epoch": 1})
    for name in ("results.json", "image_adapter.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
