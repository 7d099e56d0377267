"""Compare two configurations over several seeds: mean ± std per metric and a paired test.

Seed 001's fair-comparison checklist ends with "statistical significance testing (multiple
seeds)". Given the results JSON files that test.py wrote for runs of configuration A (e.g. the
base AA-CLIP) and configuration B (e.g. cross-attention fine-tuned from it), this prints per
metric the macro mean of each run summarised as mean ± sample std (ddof 1) over seeds, the mean
paired difference B − A, and two paired tests over the runs: Student's paired t-test
(scipy.stats.ttest_rel) and the Wilcoxon signed-rank test (scipy.stats.wilcoxon, exact for small
n). Values are percent (100 × the stored fractions).

    python scripts/compare_runs.py \
        --a ckpt/base_s1/results_MVTec.json ckpt/base_s2/results_MVTec.json ... \
        --b ckpt/cross_s1/results_MVTec.json ckpt/cross_s2/results_MVTec.json ... \
        [--names base cross_attn] [--pair seed|order] [--out comparison.json]

Runs are paired by the training seed recorded in each file (`meta.train_seed`; `--pair order`
pairs them in the order given). Both sides must be results of the same data set, columns,
classes and undefined-metric mode. With n seeds the smallest two-sided Wilcoxon p-value is
2 / 2^n (0.25 for 3 seeds, 0.0625 for 5): it cannot reach 0.05 below 6 seeds, so it is printed
next to the t-test, never instead of it. A t-test with zero variance in the differences is
undefined (NaN).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.core.checkpoint import atomic_write  # noqa: E402
from utils.core.errors import ConfigError, DataError, UserError  # noqa: E402

logger = logging.getLogger("compare_runs")


def load_run(path: Path) -> dict:
    """A test.py results JSON: {"meta", "columns", "undefined", "per_class", "mean", ...}."""
    try:
        run = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; pass results_<dataset>.json files") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error}); pass test.py's results") from None
    if not isinstance(run, dict) or not {"columns", "mean", "per_class"} <= run.keys():
        raise DataError(f"{path} is not a results file of test.py (no columns/mean/per_class)")
    run["path"] = str(path)
    return run


def _signature(run: dict) -> tuple:
    meta = run.get("meta") or {}
    return (
        meta.get("dataset"),
        tuple(run["columns"]),
        run.get("undefined"),
        *sorted(run["per_class"]),
    )


def check_comparable(runs_a: list[dict], runs_b: list[dict]) -> None:
    """Every run must share data set, columns, classes and undefined mode with the first."""
    reference = runs_a[0]
    for run in runs_a + runs_b:
        if _signature(run) != _signature(reference):
            raise DataError(
                f"{run['path']} and {reference['path']} differ in data set, columns, classes or "
                "undefined mode; compare results of the same evaluation"
            )


def pair_runs(runs_a: list[dict], runs_b: list[dict], pair: str) -> list[tuple[dict, dict]]:
    """Pairs (A run, B run): by `meta.train_seed` (`pair="seed"`) or in the order given."""
    if len(runs_a) != len(runs_b):
        raise ConfigError(f"--a has {len(runs_a)} files and --b {len(runs_b)}; pass one per seed")
    if len(runs_a) < 2:
        raise ConfigError("a paired comparison needs at least 2 seeds per configuration")
    if pair == "order":
        return list(zip(runs_a, runs_b, strict=True))
    by_seed = []
    for side, runs in (("--a", runs_a), ("--b", runs_b)):
        seeds = {}
        for run in runs:
            seed = (run.get("meta") or {}).get("train_seed")
            if seed is None:
                raise DataError(
                    f"{run['path']} records no training seed; pass --pair order to pair by position"
                )
            if seed in seeds:
                raise DataError(f"{side} has two runs of seed {seed}: {seeds[seed]}, {run['path']}")
            seeds[seed] = run
        by_seed.append(seeds)
    seeds_a, seeds_b = by_seed
    if seeds_a.keys() != seeds_b.keys():
        raise DataError(
            f"the seeds differ: --a {sorted(seeds_a)}, --b {sorted(seeds_b)}; "
            "train both configurations with the same seeds (or pass --pair order)"
        )
    return [(seeds_a[seed], seeds_b[seed]) for seed in sorted(seeds_a)]


def _mean_value(run: dict, column: str) -> float:
    value = run["mean"].get(column)
    return math.nan if value is None else 100 * float(value)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def compare(pairs: list[tuple[dict, dict]], columns: list[str]) -> list[dict]:
    """Per column: n, A and B mean ± std, mean difference B − A ± std, t-test and Wilcoxon p."""
    rows = []
    for column in columns:
        a = np.array([_mean_value(run_a, column) for run_a, _ in pairs])
        b = np.array([_mean_value(run_b, column) for _, run_b in pairs])
        defined = ~(np.isnan(a) | np.isnan(b))
        a, b = a[defined], b[defined]
        row = {"metric": column, "n": int(defined.sum())}
        if row["n"] < 2:
            rows.append(
                {
                    **row,
                    **dict.fromkeys(
                        ("a", "a_std", "b", "b_std", "diff", "diff_std", "t_p", "wilcoxon_p"),
                        math.nan,
                    ),
                }
            )
            continue
        differences = b - a
        row["a"], row["a_std"] = _mean_std(a)
        row["b"], row["b_std"] = _mean_std(b)
        row["diff"], row["diff_std"] = _mean_std(differences)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            row["t_p"] = float(stats.ttest_rel(b, a).pvalue)
        if np.all(differences == 0):
            row["wilcoxon_p"] = 1.0
        else:
            row["wilcoxon_p"] = float(stats.wilcoxon(b, a).pvalue)
        rows.append(row)
    return rows


def _cell(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def format_comparison(rows: list[dict], names: tuple[str, str]) -> str:
    """A Markdown table of `compare`'s rows."""
    header = (
        f"| metric | n | {names[0]} | {names[1]} | {names[1]} − {names[0]} "
        "| paired t p | Wilcoxon p |"
    )
    lines = [header, "|" + "---|" * 7]
    for row in rows:
        lines.append(
            f"| {row['metric']} | {row['n']} | {_cell(row['a'], row['a_std'])} "
            f"| {_cell(row['b'], row['b_std'])} | {_cell(row['diff'], row['diff_std'])} "
            f"| {_p(row['t_p'])} | {_p(row['wilcoxon_p'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, nargs="+", required=True, help="results of config A")
    parser.add_argument("--b", type=Path, nargs="+", required=True, help="results of config B")
    parser.add_argument("--names", nargs=2, default=("A", "B"), help="column titles for A and B")
    parser.add_argument(
        "--pair",
        choices=("seed", "order"),
        default="seed",
        help="pair runs by their recorded training seed, or in the order given",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        runs_a = [load_run(path) for path in args.a]
        runs_b = [load_run(path) for path in args.b]
        check_comparable(runs_a, runs_b)
        pairs = pair_runs(runs_a, runs_b, args.pair)
        rows = compare(pairs, list(runs_a[0]["columns"]))
    except UserError as error:
        logger.error("%s", error)
        return 2
    dataset = (runs_a[0].get("meta") or {}).get("dataset")
    print(f"\n{dataset} | {len(pairs)} paired runs | {args.names[1]} vs {args.names[0]}\n")
    print(format_comparison(rows, tuple(args.names)))
    if args.out is not None:
        payload = {
            "names": list(args.names),
            "pairs": [[run_a["path"], run_b["path"]] for run_a, run_b in pairs],
            "rows": [
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                for row in rows
            ],
        }
        text = json.dumps(payload, indent=2) + "\n"
        atomic_write(args.out, lambda file: file.write(text), mode="w")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
