"""`benchmarks/*.py --help`: a one-sentence description naming the table, every option's help
with its default."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


def option_helps(text: str) -> dict[str, str]:
    """{first flag: its help, lines joined} of the options section of a `--help` output."""
    helps: dict[str, str] = {}
    flag = None
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):  # a flag's line; its help follows after 2+ spaces or below
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            flag = parts[0].split()[0].rstrip(",")
            helps[flag] = parts[1] if len(parts) > 1 else ""
        elif line.startswith("   ") and flag is not None:
            helps[flag] = f"{helps[flag]} {line.strip()}".strip()
    return helps


@pytest.fixture
def load_benchmark(monkeypatch):
    """Import a benchmark as a fresh module; the sys.path entries it adds go away afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield _load
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", "")).startswith(str(REPO / "benchmarks")):
            del sys.modules[name]  # `from device import ...` and the like: top-level names


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda path: path.stem)
def test_help_describes_the_table_and_shows_every_default(path, load_benchmark, capsys):
    module = load_benchmark(path)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out

    summary = module.__doc__.split("\n")[0]
    assert summary.startswith("Prints") and "table" in summary and summary.endswith(".")
    assert " ".join(summary.split()) in " ".join(text.split())
    helps = option_helps(text)
    assert len(helps) > 1
    for flag, help_text in helps.items():
        if flag == "-h":
            continue
        assert "(default" in help_text and help_text.endswith(")"), f"{flag}: {help_text!r}"
        assert not re.search(r"[,:;(]\s*\(default", help_text), f"{flag}: cut short"
