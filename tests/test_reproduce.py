"""The reproduction kit: scripts/reproduce/*.sh on the synthetic set, and paper_table.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO.parent / "shared" / "specs"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paper_table():
    return load_script("paper_table")


def run_script(
    script: str, python: Path, synthetic_root: Path, tmp_path: Path, **env: str
) -> tuple[Path, str]:
    """Run a reproduction script on the tiny backbone with Synthetic for every data set; its
    output folder and its stderr."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "Synthetic").symlink_to(synthetic_root, target_is_directory=True)
    out = tmp_path / "runs"
    environment = {
        **os.environ,
        "PYTHON": str(python),
        "MODEL_NAME": "tiny",
        "SUBSTITUTE": "Synthetic",
        "DATA_ROOT": str(data_root),
        "OUT": str(out),
        "DEVICE": "cpu",
        **env,
    }
    completed = subprocess.run(
        ["bash", str(REPO / "scripts" / "reproduce" / script)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed.stderr


def test_aaclip_script_end_to_end(python, synthetic_root, tmp_path, paper_table, capsys):
    out, stderr = run_script(
        "aaclip_zero_shot.sh",
        python,
        synthetic_root,
        tmp_path,
        TRAIN_ARGS="--text_epoch 1 --image_epoch 1 --image_batch_size 8",
        EPOCH="1",
        VISA_TESTS="MVTec",
        MVTEC_TESTS="",  # no test set: the MVTec-trained model is not trained
    )
    runs = sorted(out.iterdir())
    assert [run.name for run in runs] == ["aaclip_full_from_VisA"]
    assert "MVTEC_TESTS is empty: skipping the model trained on MVTec" in stderr
    manifest = json.loads((out / "aaclip_full_from_VisA" / "reproduce.json").read_text())
    assert manifest["seed"] == 111 and manifest["substitute"] == "Synthetic"
    eval_dir = out / "aaclip_full_from_VisA" / "eval" / "MVTec"
    assert [p.name for p in eval_dir.glob("*.json")] == ["results_Synthetic_image_adapter_1.json"]
    results = json.loads(next(eval_dir.glob("*.json")).read_text())
    assert results["meta"]["train_seed"] == 111
    assert results["meta"]["checkpoint"].endswith("image_adapter_1.pth")

    assert paper_table.main([str(run) for run in runs]) == 0
    table = capsys.readouterr().out
    ours = 100 * results["mean"]["P-AUROC"]
    assert f"| MVTec | P-AUROC | 91.90 | {ours:.2f} | —† |" in table  # no difference: Synthetic
    assert "† No difference: MVTec ran on Synthetic, not on the paper's data" in table
    assert "| BTAD | P-AUROC | 97.00 | not run |" in table
    assert "substituted by Synthetic" in table


def test_feclip_script_end_to_end(python, synthetic_root, tmp_path, paper_table, capsys):
    out, _ = run_script(
        "feclip_zero_shot.sh",
        python,
        synthetic_root,
        tmp_path,
        TRAIN_ARGS="--epochs 1 --batch_size 8",
        MVTEC_TESTS="BTAD",
    )
    runs = sorted(out.iterdir())
    assert [run.name for run in runs] == [
        "feclip_zero-shot_from_MVTec",
        "feclip_zero-shot_from_VisA",
    ]
    results = json.loads((runs[1] / "eval" / "MVTec" / "results_Synthetic.json").read_text())
    assert results["meta"]["pro_variant"] == "anomalyclip"
    assert results["meta"]["train_seed"] == 42
    assert paper_table.main([str(run) for run in runs]) == 0
    table = capsys.readouterr().out
    ours = 100 * results["mean"]["AUPRO"]
    assert f"| MVTec | AUPRO | 88.30 | {ours:.2f} | —† |" in table
    assert "| BTAD | I-AUROC | 90.30 |" in table and "| VisA | I-AUROC | 84.60 | not run |" in table


def test_sowa_script_end_to_end(python, synthetic_root, tmp_path, paper_table, capsys):
    out, stderr = run_script("sowa_4shot.sh", python, synthetic_root, tmp_path, MVTEC_TESTS="")
    runs = sorted(out.iterdir())
    assert [run.name for run in runs] == ["sowa_4-shot_from_VisA"]
    assert "MVTEC_TESTS is empty: skipping the model trained on MVTec" in stderr
    (results_file,) = (runs[0] / "eval" / "MVTec").glob("results_Synthetic*.json")
    results = json.loads(results_file.read_text())
    assert results["meta"]["pro_variant"] == "sowa"
    assert results["meta"]["k_shot"] == 4 and results["meta"]["support_seed"] == 42
    assert paper_table.main([str(run) for run in runs]) == 0
    table = capsys.readouterr().out
    ours = 100 * results["mean"]["I-AUROC"]
    assert f"| MVTec | I-AUROC | 96.80 ± 0.3 | {ours:.2f} | —† |" in table


def test_paper_table_refuses_a_folder_without_manifest(paper_table, tmp_path, caplog):
    assert paper_table.main([str(tmp_path)]) == 2
    assert "no reproduce.json" in caplog.text


def test_paper_numbers_are_well_formed(paper_table):
    numbers = paper_table.load_paper_numbers()
    METRICS = paper_table.METRICS
    assert set(numbers) == {"aaclip", "feclip", "sowa"}
    for entries in numbers.values():
        keys = [(e["setting"], e["train"], e["test"]) for e in entries]
        metrics = [
            (key, m) for key, e in zip(keys, entries, strict=True) for m in e if m in METRICS
        ]
        assert len(metrics) == len(set(metrics)), "a number is given twice"
        for entry in entries:
            assert any(metric in entry for metric in paper_table.METRICS)


@pytest.mark.skipif(not SPECS.is_dir(), reason="the project's specs are not beside this clone")
def test_every_paper_number_is_in_the_spec_it_cites(paper_table):
    """Each value appears in the cited spec file (e.g. 'aaclip.md §15.1' -> specs/aaclip.md)."""
    numbers = yaml.safe_load((REPO / "scripts" / "reproduce" / "paper_numbers.yaml").read_text())
    for method, entries in numbers.items():
        for entry in entries:
            spec_file = SPECS / re.match(r"(\S+\.md)", entry["spec"])[1]
            text = spec_file.read_text()
            values = [entry[m] for m in paper_table.METRICS if m in entry]
            values += list((entry.get("std") or {}).values())
            for value in values:
                pattern = rf"(?<![\d.]){re.escape(f'{value:g}')}0*(?![\d])"
                assert re.search(pattern, text), (
                    f"{method} {entry['test']}: {value} not in {spec_file}"
                )


def test_paper_table_gives_a_difference_only_for_the_papers_data(paper_table):
    """Ours minus paper where the paper's data set ran; "—†" and a footnote where another did."""
    manifest = {
        "method": "sowa",
        "setting": "4-shot",
        "train": "MVTec",
        "seed": 2025,
        "checkpoint": "sowa.pth",
        "model_name": "ViT-L-14-336",
        "substitute": None,
    }
    results = {
        "VisA": {"mean": {"I-AUROC": 0.9}, "meta": {"dataset": "VisA"}},
        "BTAD": {"mean": {"I-AUROC": 0.95}, "meta": {"dataset": "Synthetic"}},
    }
    rows = paper_table.paper_rows(paper_table.load_paper_numbers(), manifest)
    table = paper_table.format_run(manifest, results, rows)
    assert "| VisA | I-AUROC | 92.90 ± 0.2 | 90.00 | -2.90 |" in table
    assert "| BTAD | I-AUROC | 94.80 ± 0.2 | 95.00 | —† |" in table
    assert "† No difference: BTAD ran on Synthetic, not on the paper's data" in table
    assert "| DAGM | I-AUROC | 98.90 ± 0.3 | not run |" in table

    whole_run = paper_table.format_run({**manifest, "substitute": "Synthetic"}, results, rows)
    assert "| VisA | I-AUROC | 92.90 ± 0.2 | 90.00 | —† |" in whole_run
    assert "VisA ran on Synthetic, BTAD ran on Synthetic" in whole_run
    assert "-2.90" not in whole_run


def script_test_lists(script: Path) -> dict[str, list[str]]:
    """{training data set: default test data sets} of a reproduction script (with what it
    sources)."""
    text = script.read_text()
    for sourced in re.findall(r'source "\$\(dirname "\$0"\)/(\w+\.sh)"', text):
        text += (script.parent / sourced).read_text()
    defaults = re.findall(r'^(VISA|MVTEC)_TESTS="\$\{\1_TESTS-([^}]*)\}"', text, re.M)
    train = {"VISA": "VisA", "MVTEC": "MVTec"}
    return {train[side]: tests.split() for side, tests in defaults}


def test_readme_lists_each_scripts_data_sets():
    """The README's "trains → tests" column is each script's default VISA_TESTS / MVTEC_TESTS."""
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `(scripts/reproduce/[^`]+)` \| [^|]+ \| ([^|]+) \|$", readme, re.M)
    checked = 0
    for path, directions in rows:
        if not (REPO / path).is_file():
            continue  # aaclip_{2,16,64}shot.sh: "the same"
        listed = {}
        for direction in directions.strip().split("; "):
            train, tests = direction.split(" → ")
            listed[train] = tests.split(", ")
        assert listed == script_test_lists(REPO / path), path
        checked += 1
    assert checked == 3
