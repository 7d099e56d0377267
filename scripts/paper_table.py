"""Published numbers next to ours: one Markdown table per reproduction run.

    python scripts/paper_table.py runs/reproduce/aaclip_full_from_VisA runs/reproduce/...
    python scripts/paper_table.py runs/reproduce/*          # every run of the reproduction kit

A run folder is what a script of scripts/reproduce/ writes: `reproduce.json` (method, setting,
training data set, seed, evaluated checkpoint) and `eval/<data set>/results_*.json` from test.py.
For each data set and metric the paper reports, the table prints the paper's number (± its std
where published), ours (the macro mean over classes, as the papers average), the difference and
where the paper's number comes from. The numbers live in scripts/reproduce/paper_numbers.yaml,
each with its source and the spec section it was copied from. Data sets the paper reports but the
run did not evaluate show as "not run". A data set that ran on other data (the run's SUBSTITUTE,
e.g. the synthetic smoke test, or a results file naming another data set than its folder) shows
ours but "—†" for the difference, with a footnote naming what ran instead: the numbers are not
comparable, so no difference is printed to be misread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.core.errors import DataError, UserError  # noqa: E402

logger = logging.getLogger("paper_table")

PAPER_NUMBERS = Path(__file__).resolve().parent / "reproduce" / "paper_numbers.yaml"
METRICS = ("P-AUROC", "P-AP", "AUPRO", "I-AUROC", "I-AP")
ENTRY_KEYS = {"setting", "train", "test", "source", "spec", "std"}


def load_paper_numbers(path: Path = PAPER_NUMBERS) -> dict[str, list[dict]]:
    """{method: [entry]}; each entry has setting, train, test, source, spec and metric values."""
    numbers = yaml.safe_load(Path(path).read_text())
    for method, entries in numbers.items():
        for entry in entries:
            unknown = set(entry) - ENTRY_KEYS - set(METRICS)
            if unknown or not {"setting", "train", "test", "source", "spec"} <= set(entry):
                raise DataError(f"{path}: {method} entry {entry} has unknown or missing keys")
    return numbers


def paper_rows(numbers: dict[str, list[dict]], manifest: dict) -> list[dict]:
    """(test, metric, paper value, std, source) of the run's method, setting and training set."""
    rows = []
    for entry in numbers.get(manifest["method"], []):
        if entry["setting"] != manifest["setting"] or entry["train"] != manifest["train"]:
            continue
        for metric in METRICS:
            if metric in entry:
                rows.append(
                    {
                        "test": entry["test"],
                        "metric": metric,
                        "paper": float(entry[metric]),
                        "std": (entry.get("std") or {}).get(metric),
                        "source": f"{entry['source']} ({entry['spec']})",
                    }
                )
    tests = list(dict.fromkeys(row["test"] for row in rows))
    return sorted(rows, key=lambda row: (tests.index(row["test"]), METRICS.index(row["metric"])))


def load_run(run: Path) -> tuple[dict, dict[str, dict]]:
    """(manifest, {test data set: results JSON}) of a reproduction run folder."""
    manifest_path = run / "reproduce.json"
    if not manifest_path.is_file():
        raise DataError(f"{run} has no reproduce.json; pass folders written by scripts/reproduce")
    manifest = json.loads(manifest_path.read_text())
    results = {}
    for folder in sorted((run / "eval").glob("*")):
        files = sorted(folder.glob("results_*.json"))
        if len(files) > 1:
            raise DataError(f"{folder} holds several results files; keep the evaluated one")
        if files:
            results[folder.name] = json.loads(files[0].read_text())
    return manifest, results


def ours(results: dict[str, dict], test: str, metric: str) -> float | None:
    """Our macro mean in percent, or None when not run or undefined."""
    if test not in results:
        return None
    value = results[test].get("mean", {}).get(metric)
    return None if value is None else 100 * float(value)


def substitute(manifest: dict, results: dict[str, dict], test: str) -> str | None:
    """The data set that ran in place of the paper's `test` (the run's SUBSTITUTE, or the one its
    results file names when that is not `test`), or None when `test` itself ran."""
    evaluated = results[test].get("meta", {}).get("dataset", test)
    return manifest.get("substitute") or (evaluated if evaluated != test else None)


def format_run(manifest: dict, results: dict[str, dict], rows: list[dict]) -> str:
    """Markdown heading and table of one run."""
    heading = (
        f"### {manifest['method']} {manifest['setting']}, trained on {manifest['train']} "
        f"(seed {manifest['seed']}, {manifest['checkpoint']}, {manifest['model_name']})"
    )
    if manifest.get("substitute"):
        heading += (
            f"\n\nEvery data set was substituted by {manifest['substitute']}: the numbers only "
            "show that the pipeline runs."
        )
    lines = [
        heading,
        "",
        "| data set | metric | paper | ours | ours − paper | paper source |",
        "|---|---|---:|---:|---:|---|",
    ]
    substituted = {}  # paper's data set -> the one that ran instead
    for row in rows:
        paper = f"{row['paper']:.2f}" + (f" ± {row['std']:.1f}" if row["std"] is not None else "")
        value = ours(results, row["test"], row["metric"])
        if row["test"] not in results:
            mine, difference = "not run", ""
        elif value is None or math.isnan(value):
            mine, difference = "n/a", ""
        elif replacement := substitute(manifest, results, row["test"]):
            substituted[row["test"]] = replacement
            mine, difference = f"{value:.2f}", "—†"
        else:
            mine, difference = f"{value:.2f}", f"{value - row['paper']:+.2f}"
        lines.append(
            f"| {row['test']} | {row['metric']} | {paper} | {mine} | {difference} | "
            f"{row['source']} |"
        )
    if not rows:
        lines.append(
            f"| — | — | no published number for this setting in {PAPER_NUMBERS.name} | | | |"
        )
    if substituted:
        ran = ", ".join(f"{test} ran on {data}" for test, data in substituted.items())
        lines.append(
            f"\n† No difference: {ran}, not on the paper's data, so ours is not comparable "
            "with the paper's number."
        )
    extra = sorted(set(results) - {row["test"] for row in rows})
    if extra:
        lines.append(f"\nEvaluated without a paper number: {', '.join(extra)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of scripts/reproduce")
    parser.add_argument("--numbers", type=Path, default=PAPER_NUMBERS, help="paper numbers YAML")
    args = parser.parse_args(argv)
    try:
        numbers = load_paper_numbers(args.numbers)
        tables = []
        for run in args.runs:
            manifest, results = load_run(run)
            tables.append(format_run(manifest, results, paper_rows(numbers, manifest)))
    except UserError as error:
        logger.error("%s", error)
        return 2
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
