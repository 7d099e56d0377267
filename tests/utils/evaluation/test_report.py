"""utils/evaluation/report.py: macro means with coverage, AA-CLIP's official rounding, atomic
files."""

import csv
import json
import math
import os

import pytest

from utils.core.errors import ConfigError
from utils.evaluation.report import format_table, summarize, write_results

COLUMNS = ["P-AUROC", "I-AUROC"]
PER_CLASS = {
    "bottle": {"P-AUROC": 0.91234, "I-AUROC": 0.9},
    "cable": {"P-AUROC": 0.8, "I-AUROC": math.nan},
    "Kvasir": {"P-AUROC": 0.7, "I-AUROC": 0.5},
}


def test_summarize_skips_nan_and_reports_coverage():
    row = summarize(PER_CLASS, COLUMNS)
    assert row["P-AUROC"] == pytest.approx((0.91234 + 0.8 + 0.7) / 3)
    assert row["I-AUROC"] == pytest.approx(0.7)
    assert row["P-AUROC coverage"] == "3/3"
    assert row["I-AUROC coverage"] == "2/3"


def test_summarize_zero_reproduces_aaclip_rounding():
    row = summarize(PER_CLASS, COLUMNS, undefined="zero")
    assert row["P-AUROC"] == pytest.approx((91.23 + 80.0 + 70.0) / 300)
    assert row["I-AUROC"] == pytest.approx((90.0 + 0.0 + 50.0) / 300)
    table = format_table({"bottle": {"P-AUROC": 0.91234}}, ["P-AUROC"], undefined="zero")
    assert "| bottle | 91.23 |" in table
    assert "| mean | 91.23 |" in table


def test_format_table_nan_mode():
    table = format_table(PER_CLASS, COLUMNS)
    lines = table.splitlines()
    assert lines[0] == "| class | P-AUROC | I-AUROC |"
    assert "| cable | 80.0 | n/a |" in lines
    assert lines[-1] == "| mean | 80.4 | 70.0 (2/3) |"


def test_format_table_drops_a_column_undefined_everywhere():
    per_class = {"a": {"P-AUROC": 0.5, "I-AUROC": math.nan}, "b": {"P-AUROC": 0.7}}
    table = format_table(per_class, COLUMNS, decimals=2)
    assert "I-AUROC" not in table
    assert "| mean | 60.00 |" in table
    assert "I-AUROC" in format_table(per_class, COLUMNS, undefined="zero")


def test_unknown_undefined_mode():
    with pytest.raises(ConfigError, match="nan, zero"):
        summarize(PER_CLASS, COLUMNS, undefined="skip")


def test_write_results_files(tmp_path):
    meta = {"dataset": "MVTec", "epoch": 15, "resolution": 518, "config": {"lr": 1e-3}}
    paths = write_results(tmp_path / "out", "mvtec_epoch15", PER_CLASS, COLUMNS, meta)
    assert sorted(paths) == ["csv", "json", "md"]
    payload = json.loads(paths["json"].read_text())
    assert payload["meta"] == meta
    assert payload["per_class"]["cable"] == {"P-AUROC": 0.8, "I-AUROC": None}
    assert payload["per_class"]["bottle"]["P-AUROC"] == 0.91234
    assert payload["mean"]["I-AUROC"] == pytest.approx(0.7)
    assert payload["coverage"]["I-AUROC"] == "2/3"
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["class", *COLUMNS]
    assert rows[1] == ["bottle", "91.2340", "90.0000"]
    assert rows[2] == ["cable", "80.0000", ""]
    assert rows[-1][0] == "mean"
    markdown = paths["md"].read_text()
    assert markdown.startswith("dataset: MVTec | epoch: 15 | resolution: 518 | undefined: nan")
    assert format_table(PER_CLASS, COLUMNS) in markdown


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    paths = write_results(tmp_path, "run", PER_CLASS, COLUMNS, {"dataset": "MVTec"})
    before = paths["json"].read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    changed = {"bottle": {"P-AUROC": 0.1, "I-AUROC": 0.2}}
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path, "run", changed, COLUMNS, {"dataset": "MVTec"})
    assert paths["json"].read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.json", "run.md"]
