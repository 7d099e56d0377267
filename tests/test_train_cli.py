"""train.py and test.py end to end through `main([...])` on the tiny backbone and synthetic set."""

from __future__ import annotations

import collections
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import test as test_script
import train
from datasets import anomaly
from datasets.anomaly import build_test_datasets
from datasets.metadata import load_test_records
from datasets.preprocessing import Preprocessing
from utils.core.checkpoint import load_checkpoint
from utils.evaluation import evaluate

FAST = [
    "--text_epoch",
    "1",
    "--image_epoch",
    "2",
    "--text_batch_size",
    "8",
    "--image_batch_size",
    "8",
    "--shot",
    "8",
    "--device",
    "cpu",
]


def train_args(data_root, save_path, *extra):
    return ["--data_root", str(data_root), "--save_path", str(save_path), *FAST, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """One short training run shared by the evaluation tests (read-only for them)."""
    data_root = tmp_path_factory.mktemp("cli") / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    save_path = data_root.parent / "run"
    assert train.main(train_args(data_root, save_path)) == 0
    return data_root, save_path


def test_training_writes_checkpoints_with_the_original_keys(trained):
    _, save_path = trained
    names = {path.name for path in save_path.iterdir()}
    assert {
        "text_adapter.pth",
        "image_adapter.pth",
        "image_adapter_1.pth",
        "image_adapter_2.pth",
        "train.log",
        "config.yaml",
    } <= names
    text = load_checkpoint(save_path / "text_adapter.pth")
    assert {"epoch", "text_adapter", "text_optimizer", "config"} <= set(text)
    image = load_checkpoint(save_path / "image_adapter.pth")
    assert {"epoch", "image_adapter", "image_optimizer", "config"} <= set(image)
    assert image["epoch"] == 2 and image["config"]["relu"] is False


def test_evaluation_writes_tables(trained, capsys):
    data_root, save_path = trained
    argv = ["--data_root", str(data_root), "--save_path", str(save_path), "--device", "cpu"]
    assert test_script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| mean |" in printed and "P-AUROC" in printed and "AUPRO" in printed
    results = json.loads((save_path / "results_Synthetic.json").read_text())
    assert results["meta"]["epoch"] == 2
    assert results["meta"]["checkpoint"].endswith("image_adapter.pth")
    assert set(results["per_class"]) == {"tile", "stripes", "dots"}
    assert 0.0 <= results["mean"]["P-AUROC"] <= 1.0
    for suffix in (".csv", ".md"):
        assert (save_path / f"results_Synthetic{suffix}").is_file()


def test_official_table_and_visualisation(trained, capsys, tmp_path):
    data_root, save_path = trained
    run = tmp_path / "copy"
    shutil.copytree(save_path, run)
    argv = [
        "--data_root",
        str(data_root),
        "--save_path",
        str(run),
        "--metrics",
        "official",
        "--all_epochs",
        "--visualize",
        "--device",
        "cpu",
    ]
    assert test_script.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.index("image_adapter_1.pth") < printed.index("image_adapter_2.pth")
    header = next(line for line in printed.splitlines() if line.startswith("| class"))
    assert re.findall(r"[PI]-\w+", header) == ["P-AUROC", "P-AP", "I-AUROC", "I-AP"]
    panels = list((run / "visualization" / "Synthetic").rglob("*.png"))
    assert len(panels) == 3 * 32


@pytest.mark.parametrize(("vis_size", "side"), [("model", 64), ("original", 96)])
def test_panels_show_the_image_the_model_saw_or_the_file(trained, tmp_path, vis_size, side):
    data_root, save_path = trained
    argv = ["--data_root", str(data_root), "--save_path", str(save_path), "--device", "cpu"]
    argv += ["--visualize", "--vis_size", vis_size, "--results_dir", str(tmp_path)]
    assert test_script.main(argv) == 0
    panel = tmp_path / "visualization" / "Synthetic" / "tile" / "tile_test_blob_000.png"
    picture = np.asarray(Image.open(panel))
    assert picture.shape == (side, 3 * side, 3)  # [image | ground truth | heat]
    with Image.open(data_root / "tile" / "test" / "blob" / "000.png") as file:
        image = file.convert("RGB")
    if vis_size == "model":  # the loader's pixels, not a second decode
        image = image.resize((64, 64), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(picture[:, :side], np.asarray(image))


def test_all_epochs_decode_each_image_once_and_equal_one_file_at_a_time(
    trained, tmp_path, monkeypatch
):
    data_root, save_path = trained
    common = ["--data_root", str(data_root), "--save_path", str(save_path), "--device", "cpu"]
    alone = {}
    for epoch in (1, 2):
        out = tmp_path / f"alone_{epoch}"
        checkpoint = str(save_path / f"image_adapter_{epoch}.pth")
        assert (
            test_script.main([*common, "--checkpoint", checkpoint, "--results_dir", str(out)]) == 0
        )
        alone[epoch] = json.loads(
            (out / f"results_Synthetic_image_adapter_{epoch}.json").read_text()
        )
    opened = collections.Counter()
    read = anomaly.read_image

    def counting_read(path, pad_color):
        opened[str(path)] += 1
        return read(path, pad_color)

    monkeypatch.setattr(anomaly, "read_image", counting_read)
    out = tmp_path / "together"
    assert test_script.main([*common, "--all_epochs", "--results_dir", str(out)]) == 0
    assert len(opened) == 3 * 32 and set(opened.values()) == {1}  # every image decoded once
    for epoch in (1, 2):
        together = json.loads((out / f"results_Synthetic_image_adapter_{epoch}.json").read_text())
        assert together["per_class"] == alone[epoch]["per_class"]
        del together["meta"]["config"], alone[epoch]["meta"]["config"]
        assert together["meta"] == alone[epoch]["meta"]  # epoch, checkpoint and weight files


@pytest.mark.parametrize("workers", [0, 2])
def test_one_loader_gives_each_class_its_batches_in_order(synthetic_root, workers):
    records = load_test_records("Synthetic", synthetic_root)
    datasets = build_test_datasets(records, synthetic_root, Preprocessing(64))
    groups = evaluate.class_batches(datasets, 5, workers, torch.device("cpu"))
    seen = []
    for class_name, group in groups:
        batches = list(group)
        names = [item.file for batch in batches for item in batch.items]
        assert all(len(batch.items) == len(batch.images) <= 5 for batch in batches)
        assert names == [record["image_path"] for record in datasets[class_name].records]
        seen.append(class_name)
    assert seen == list(datasets)


def test_all_epochs_are_sorted_numerically(tmp_path):
    for epoch in (1, 2, 10, 11):
        (tmp_path / f"image_adapter_{epoch}.pth").touch()
    config, _ = test_script.parse_args(["--save_path", str(tmp_path), "--all_epochs"])
    model, files = evaluate.checkpoint_files(config)
    assert model == "aaclip"
    assert [path.name for path in files] == [
        "image_adapter_1.pth",
        "image_adapter_2.pth",
        "image_adapter_10.pth",
        "image_adapter_11.pth",
    ]


def test_losses_fall_on_the_synthetic_set(synthetic_root, tmp_path, caplog):
    data_root = tmp_path / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    argv = [
        "--data_root",
        str(data_root),
        "--save_path",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--text_epoch",
        "3",
        "--image_epoch",
        "3",
        "--text_lr",
        "1e-3",
        "--image_lr",
        "1e-3",
        "--shot",
        "16",
        "--text_batch_size",
        "8",
        "--image_batch_size",
        "4",
        "--no-augment",
    ]
    with caplog.at_level("INFO", logger="train"):
        assert train.main(argv) == 0
    text = [float(m) for m in re.findall(r"text epoch \d/3: loss ([\d.]+)", caplog.text)]
    image = [float(m) for m in re.findall(r"image epoch \d/3: loss ([\d.]+)", caplog.text)]
    assert len(text) == 3 and text[-1] < text[0]
    assert len(image) == 3 and image[-1] < image[0]


def test_resume_matches_an_uninterrupted_run(synthetic_root, tmp_path):
    data_root = tmp_path / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [
        "--text_epoch",
        "1",
        "--image_batch_size",
        "8",
        "--text_batch_size",
        "8",
        "--shot",
        "8",
        "--device",
        "cpu",
        "--data_root",
        str(data_root),
    ]
    assert train.main([*common, "--save_path", str(full), "--image_epoch", "2"]) == 0
    assert train.main([*common, "--save_path", str(resumed), "--image_epoch", "1"]) == 0
    assert train.main([*common, "--save_path", str(resumed), "--image_epoch", "2"]) == 0
    expected = load_checkpoint(full / "image_adapter.pth")
    got = load_checkpoint(resumed / "image_adapter.pth")
    assert got["epoch"] == 2
    for key, value in expected["image_adapter"].items():
        assert torch.equal(got["image_adapter"][key], value), key


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--dataset", "MVTec", "--data_root", "/nonexistent/mvtec"], "does not exist"),
        (["--dataset", "KolektorSDD"], "KolektorSDD"),
        (["--shot", "64"], "--shot 64"),
        (["--shot", "-1"], "--shot -1"),
        (["--levels", "6", "12", "18", "30"], "--levels 6 12 18 30"),
        (["--image_batch_size", "0"], "--image_batch_size 0 must be >= 1"),
        (["--text_lr", "-1"], "--text_lr -1.0 must be > 0"),
    ],
)
def test_bad_training_input_is_one_line(
    synthetic_root, tmp_path, caplog, extra, expected, one_line_error
):
    argv = [
        "--data_root",
        str(synthetic_root),
        "--save_path",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        *extra,
    ]
    assert train.main(argv) == 2
    assert expected in one_line_error()


def test_unrecognised_layout_is_one_line(tmp_path, caplog, one_line_error):
    (tmp_path / "mvtec" / "junk").mkdir(parents=True)
    argv = [
        "--dataset",
        "MVTec",
        "--model_name",
        "tiny",
        "--data_root",
        str(tmp_path / "mvtec"),
        "--save_path",
        str(tmp_path / "run"),
    ]
    assert train.main(argv) == 2
    assert "layout" in one_line_error()


def test_corrupt_image_and_mask_size_are_one_line(synthetic_root, tmp_path, caplog, one_line_error):
    data_root = tmp_path / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    image = next((data_root / "tile" / "test" / "good").glob("*.png"))
    image.write_bytes(b"not a png")
    argv = [
        "--data_root",
        str(data_root),
        "--save_path",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--training_mode",
        "full_shot",
        "--text_epoch",
        "1",
        "--image_epoch",
        "0",
    ]
    assert train.main(argv) == 2
    assert image.name in one_line_error()

    caplog.clear()
    shutil.rmtree(data_root)
    shutil.copytree(synthetic_root, data_root)
    mask = next((data_root / "tile" / "ground_truth").rglob("*_mask.png"))
    from PIL import Image

    Image.new("L", (10, 10)).save(mask)
    assert train.main(argv) == 2
    assert mask.name in one_line_error()


def test_checkpoint_from_another_configuration_names_the_flag(trained, caplog, one_line_error):
    data_root, save_path = trained
    argv = ["--data_root", str(data_root), "--save_path", str(save_path), "--relu"]
    assert test_script.main(argv) == 2
    assert "pass no --relu" in one_line_error() or "--no-relu" in one_line_error()


def test_unknown_class_in_the_records_is_one_line(synthetic_root, tmp_path, caplog, one_line_error):
    data_root = tmp_path / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    record = {
        "image_path": "tile/test/good/000.png",
        "label": 0,
        "class_name": "widget",
        "mask_path": "",
    }
    (data_root / "full-shot.jsonl").write_text(json.dumps(record) + "\n")
    argv = [
        "--data_root",
        str(data_root),
        "--save_path",
        str(tmp_path / "run"),
        "--training_mode",
        "full_shot",
    ]
    assert train.main(argv) == 2
    assert "widget" in one_line_error()
