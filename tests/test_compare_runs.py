"""scripts/compare_runs.py on results files written by utils.evaluation.report.write_results."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from utils.evaluation.report import write_results

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"
COLUMNS = ["pixel_auroc", "image_auroc"]


@pytest.fixture(scope="module")
def compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, seed: int | None, values: dict[str, dict[str, float]]) -> Path:
    """A results file with per-class values {class: {column: fraction}} and a training seed."""
    meta = {"dataset": "Synthetic", "model": "aaclip", "train_seed": seed}
    return write_results(folder, "results_Synthetic", values, COLUMNS, meta)["json"]


def make_runs(tmp_path: Path, name: str, seeds: list[int], rng: np.random.Generator, shift: float):
    paths, means = [], {}
    for seed in seeds:
        values = {
            cls: {col: float(np.clip(rng.uniform(0.6, 0.9) + shift, 0, 1)) for col in COLUMNS}
            for cls in ("bottle", "grid")
        }
        paths.append(write_run(tmp_path / f"{name}_{seed}", seed, values))
        means[seed] = {col: 100 * np.mean([v[col] for v in values.values()]) for col in COLUMNS}
    return paths, means


def test_statistics_match_hand_computation(compare_runs, tmp_path, capsys):
    rng = np.random.default_rng(0)
    seeds = [1, 2, 3, 4, 5]
    paths_a, means_a = make_runs(tmp_path, "a", seeds, rng, 0.0)
    paths_b, means_b = make_runs(tmp_path, "b", seeds, rng, 0.05)
    out = tmp_path / "comparison.json"
    # B given in another order: pairing goes by the recorded training seed.
    code = compare_runs.main(
        [
            "--a",
            *map(str, paths_a),
            "--b",
            *map(str, paths_b[::-1]),
            "--names",
            "base",
            "ca",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "| metric | n | base | ca | ca − base |" in capsys.readouterr().out
    rows = {row["metric"]: row for row in json.loads(out.read_text())["rows"]}
    for column in COLUMNS:
        a = np.array([means_a[s][column] for s in seeds])
        b = np.array([means_b[s][column] for s in seeds])
        d = b - a
        row = rows[column]
        assert row["n"] == 5
        assert row["a"] == pytest.approx(a.mean()) and row["a_std"] == pytest.approx(a.std(ddof=1))
        assert row["b"] == pytest.approx(b.mean()) and row["b_std"] == pytest.approx(b.std(ddof=1))
        assert row["diff"] == pytest.approx(d.mean())
        t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
        assert row["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), df=4))


def test_wilcoxon_exact_for_consistent_improvement(compare_runs, tmp_path):
    """Five seeds all improved: the exact two-sided signed-rank p-value is 2 / 2^5."""
    pairs = []
    for seed, (base, gain) in enumerate(
        [(0.7, 0.01), (0.72, 0.03), (0.69, 0.02), (0.71, 0.05), (0.7, 0.04)]
    ):
        run_a = compare_runs.load_run(
            write_run(tmp_path / f"a{seed}", seed, {"c": dict.fromkeys(COLUMNS, base)})
        )
        run_b = compare_runs.load_run(
            write_run(tmp_path / f"b{seed}", seed, {"c": dict.fromkeys(COLUMNS, base + gain)})
        )
        pairs.append((run_a, run_b))
    rows = compare_runs.compare(pairs, COLUMNS)
    assert rows[0]["wilcoxon_p"] == pytest.approx(2 / 2**5)
    assert rows[0]["diff"] == pytest.approx(3.0)


def test_identical_runs_give_no_difference(compare_runs, tmp_path):
    values = {"c": dict.fromkeys(COLUMNS, 0.8)}
    pairs = [
        tuple(
            compare_runs.load_run(write_run(tmp_path / f"{side}{seed}", seed, values))
            for side in "ab"
        )
        for seed in (1, 2, 3)
    ]
    row = compare_runs.compare(pairs, COLUMNS)[0]
    assert row["diff"] == 0 and row["wilcoxon_p"] == 1.0 and math.isnan(row["t_p"])


@pytest.mark.parametrize("problem", ["seeds", "classes", "count", "missing"])
def test_bad_input_is_a_one_line_error(compare_runs, tmp_path, caplog, problem):
    rng = np.random.default_rng(1)
    paths_a, _ = make_runs(tmp_path, "a", [1, 2], rng, 0.0)
    paths_b, _ = make_runs(tmp_path, "b", [1, 3] if problem == "seeds" else [1, 2], rng, 0.0)
    if problem == "classes":
        paths_b[0] = write_run(tmp_path / "other", 1, {"screw": dict.fromkeys(COLUMNS, 0.5)})
    if problem == "count":
        paths_b = paths_b[:1]
    if problem == "missing":
        paths_b[0] = tmp_path / "nowhere.json"
    code = compare_runs.main(["--a", *map(str, paths_a), "--b", *map(str, paths_b)])
    assert code == 2
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(messages) == 1 and "\n" not in messages[0]
