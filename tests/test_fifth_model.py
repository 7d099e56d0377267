"""Adding a model touches its model file, the registry and its YAML only (issue 25): a copy of
the repository gets tests/fifth_model's linear probe as models/patchprobe.py, one registry entry
and configs/patchprobe.yaml, and its own scripts train, evaluate, calibrate, export and score it
as they do the four published methods. Also: one stem names each registered model's class,
config, file, YAML and key."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from models.registry import MODELS
from utils.core.config import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
FIFTH = Path(__file__).resolve().parent / "fifth_model"
SKIP = ("data", "ckpt", "runs", ".git", "__pycache__", ".pytest_cache", ".ruff_cache")


@pytest.mark.parametrize("name", list(MODELS))
def test_one_stem_names_a_models_class_config_file_yaml_and_key(name):
    model = MODELS[name]
    assert model.config_class.name == name
    assert model.__module__ == f"models.{name}"
    assert model.__name__.lower() == name.replace("_", "").lower()
    assert model.config_class.__name__ == f"{model.__name__}Config"
    assert (CONFIG_DIR / f"{name}.yaml").is_file()


def add_the_fifth_model(copy: Path) -> list[str]:
    """The three edits a new model needs; returns the paths they touched."""
    shutil.copy(FIFTH / "patchprobe.py", copy / "models" / "patchprobe.py")
    shutil.copy(FIFTH / "patchprobe.yaml", copy / "configs" / "patchprobe.yaml")
    registry = copy / "models" / "registry.py"
    text = registry.read_text()
    anchor = "from models.feclip import FEClip\n"
    entry = "(AAClipCrossAttn, AAClip, FEClip, SOWA)"
    assert anchor in text and entry in text
    text = text.replace(anchor, anchor + "from models.patchprobe import PatchProbe\n")
    registry.write_text(text.replace(entry, entry[:-1] + ", PatchProbe)"))
    return ["configs/patchprobe.yaml", "models/patchprobe.py", "models/registry.py"]


def changed_files(copy: Path) -> list[str]:
    """Files of the copy that differ from the repository's or are new (outputs left out)."""
    changed = []
    for path in sorted(copy.rglob("*")):
        relative = path.relative_to(copy)
        if path.is_dir() or any(part in SKIP for part in relative.parts):
            continue
        original = REPO / relative
        if not original.is_file() or original.read_bytes() != path.read_bytes():
            changed.append(relative.as_posix())
    return changed


def test_a_fifth_model_trains_evaluates_and_deploys_through_the_scripts(
    python, synthetic_root, tmp_path
):
    copy = tmp_path / "repository"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(*SKIP))
    touched = add_the_fifth_model(copy)
    assert changed_files(copy) == touched

    def run(*argv: str) -> str:
        completed = subprocess.run(
            [python, *argv], cwd=copy, capture_output=True, text=True, timeout=600
        )
        assert completed.returncode == 0, (argv, completed.stderr[-3000:])
        return completed.stdout

    data = ["--data_root", str(synthetic_root), "--metadata_dir", str(tmp_path / "records")]
    save = tmp_path / "run"
    run("train.py", "--config", "configs/patchprobe.yaml", *data, "--save_path", str(save),
        "--shot", "4", "--device", "cpu")  # fmt: skip
    assert (save / "patchprobe.pth").is_file() and (save / "train.log").is_file()
    printed = run("test.py", "--save_path", str(save), *data, "--device", "cpu")
    assert "| mean |" in printed
    results = json.loads((save / "results_Synthetic.json").read_text())
    assert results["meta"]["model"] == "patchprobe" and results["mean"]["P-AUROC"] > 0
    normal = str(synthetic_root / "tile" / "train" / "good")
    run("predict.py", "calibrate", "--checkpoint", str(save), "--normal_dir", normal,
        "--class_name", "tile", "--device", "cpu")  # fmt: skip
    incoming = str(synthetic_root / "tile" / "test")
    scored = tmp_path / "scored"
    backend = "torch"
    if all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
        exported = tmp_path / "export"
        run("predict.py", "export", "--checkpoint", str(save), "--out", str(exported))
        assert json.loads((exported / "model.json").read_text())["model"]["name"] == "patchprobe"
        save, backend = exported, "onnxruntime"
    run("predict.py", "score", "--checkpoint", str(save), "--input", incoming,
        "--out", str(scored), "--backend", backend, "--device", "cpu")  # fmt: skip
    assert (scored / "scores.csv").read_text().count("\n") == 33  # header + 32 images
