"""The layers (issue 25, 34): an import only points down, utils.core < datasets < models <
utils.inference < utils.evaluation < utils.deploy | utils.engine (pyproject.toml's import-linter
contract, which CI runs), and scripts never import each other."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "datasets", "models")
SCRIPTS = sorted(path.stem for path in REPO.glob("*.py"))


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("lint-imports")
    if executable is None:
        pytest.skip("import-linter is not installed (pip install -r requirements.txt)")
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [executable, "--no-cache"], cwd=root, env=environment, capture_output=True, text=True
    )


def test_the_layers_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("utils/core/errors.py", "import datasets.catalog"),
        ("datasets/catalog.py", "import models.base"),
        ("models/base.py", "import utils.inference.predictor"),
        ("utils/inference/stream.py", "import utils.evaluation.metrics"),
        ("utils/evaluation/metrics.py", "import utils.deploy.calibration"),
        ("utils/engine/training.py", "import utils.deploy.field"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{upward}  # a deliberate upward import\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    importer = module.removesuffix(".py").replace("/", ".")
    assert "BROKEN" in result.stdout and f"{importer} -> {upward.split()[-1]}" in result.stdout


def test_scripts_import_no_script():
    """train.py, test.py, predict.py, ... and benchmarks/, scripts/ import packages only."""
    files = [*REPO.glob("*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py")]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in SCRIPTS, f"{path.name} imports {name}"
