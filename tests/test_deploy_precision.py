"""Deployment beyond one fp32 class (issue 29): int8 and bf16 OpenVINO graphs with thresholds
calibrated on the graph itself, SOWA's k-shot memory baked into the export, several classes in
one graph, and test.py on an export. Tiny backbone, synthetic set; skipped without the
deployment extra (requirements-deploy.txt)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import predict
import test as test_script
import train
from datasets.folder import ImageFolder, list_images
from datasets.items import collate_items
from datasets.preprocessing import read_image
from datasets.support import draw_support, load_images
from datasets.tiling import TileConfig
from models.registry import load_trained_model
from utils.core.runtime import native_bf16
from utils.deploy import export, package
from utils.inference.graph import ExportedPredictor
from utils.inference.predictor import AnomalyPredictor
from utils.inference.resolution import TiledPredictor

for module in ("onnx", "onnxscript", "onnxruntime", "openvino", "nncf"):
    pytest.importorskip(module)

CLASS = "tile"
FAST = ["--device", "cpu", "--training_mode", "few_shot", "--shot", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_root):
    """A short AA-CLIP and a short SOWA run on a private copy of the synthetic set."""
    root = tmp_path_factory.mktemp("precision")
    data_root = root / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    runs = {"aaclip": root / "aaclip", "sowa": root / "sowa"}
    extra = {
        "aaclip": ["--text_epoch", "1", "--image_epoch", "1", "--text_batch_size", "4"],
        "sowa": ["--model", "sowa", "--epochs", "1", "--batch_size", "4"],
    }
    for name, run in runs.items():
        argv = ["--data_root", str(data_root), "--save_path", str(run), *FAST, *extra[name]]
        assert train.main(argv) == 0
    normal = data_root / CLASS / "train" / "good"
    argv = ["calibrate", "--checkpoint", str(runs["aaclip"]), "--normal_dir", str(normal)]
    assert predict.main([*argv, "--class_name", CLASS, "--device", "cpu"]) == 0
    return data_root, runs


def scores_of(folder) -> dict[str, float]:
    with open(folder / "scores.csv", newline="") as handle:
        import csv

        return {row["file"]: float(row["image_score"]) for row in csv.DictReader(handle)}


def test_an_int8_graph_is_quantized_calibrated_on_itself_and_scores(runs, tmp_path, caplog):
    data_root, folders = runs
    normal = data_root / CLASS / "train" / "good"
    out = tmp_path / "int8"
    argv = ["export", "--checkpoint", str(folders["aaclip"]), "--out", str(out)]
    argv += ["--format", "openvino", "--precision", "int8", "--calibration_dir", str(normal)]
    assert predict.main(argv) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["precision"] == "int8" and info["classes"] == [{"name": CLASS, "prompt": CLASS}]
    import openvino

    ops = [op.get_type_name() for op in openvino.Core().read_model(out / "model.xml").get_ops()]
    assert ops.count("FakeQuantize") > 50  # the ViT's matrix products run in int8
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["graph"] == {
        "backend": "openvino",
        "export_id": info["export_id"],
        "precision": "int8",
    }
    assert info["calibrations"][CLASS]["file"] == "calibration.json"
    again = tmp_path / "again.json"  # calibrating later on the graph gives the same thresholds
    argv = ["calibrate", "--backend", "openvino", "--checkpoint", str(out), "--normal_dir"]
    assert predict.main([*argv, str(normal), "--output", str(again)]) == 0
    recalibrated = json.loads(again.read_text())
    assert recalibrated["graph"] == calibration["graph"]
    assert recalibrated["thresholds"] == pytest.approx(calibration["thresholds"], rel=1e-6)
    scored = tmp_path / "scored"
    argv = ["score", "--checkpoint", str(out), "--backend", "openvino", "--no-overlays"]
    argv += ["--input", str(data_root / CLASS / "test"), "--out", str(scored)]
    assert predict.main(argv) == 0
    assert len(scores_of(scored)) == 32
    # thresholds of another graph (the checkpoint's) are refused for the int8 graph
    caplog.clear()
    torch_calibration = folders["aaclip"] / "calibration.json"
    assert predict.main([*argv, "--calibration", str(torch_calibration)]) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "was calibrated on torch, not on this int8 export" in errors[0]


def validation_folder(data_root, tmp_path):
    """<tmp>/validation/normal and abnormal: the class's labelled test images."""
    folder = tmp_path / "validation"
    for sub in sorted((data_root / CLASS / "test").iterdir()):
        target = folder / ("normal" if sub.name == "good" else "abnormal")
        target.mkdir(parents=True, exist_ok=True)
        for path in sub.iterdir():
            shutil.copy(path, target / f"{sub.name}_{path.name}")
    return folder


def test_int8_with_accuracy_control_records_a_drop_within_its_bound(runs, tmp_path):
    data_root, folders = runs
    validation = validation_folder(data_root, tmp_path)
    out = tmp_path / "controlled"
    argv = ["export", "--checkpoint", str(folders["aaclip"]), "--out", str(out)]
    argv += ["--format", "openvino", "--precision", "int8", "--validation_dir", str(validation)]
    argv += ["--calibration_dir", str(data_root / CLASS / "train" / "good")]
    assert predict.main([*argv, "--class_name", CLASS]) == 0
    control = json.loads((out / "model.json").read_text())["accuracy_control"]
    assert control["max_drop"] == 0.5 and control["drop"] <= 0.5
    assert control["drop"] == pytest.approx(control["fp32"] - control["int8"], abs=1e-3)
    labels = [int(path.parent.name == "abnormal") for path in sorted(validation.rglob("*.png"))]
    assert control["images"] == {"normal": labels.count(0), "abnormal": labels.count(1)}
    # the reference is the fp32 graph's AUROC, which scores as the checkpoint does
    _, model, _ = load_trained_model(folders["aaclip"], device=torch.device("cpu"))
    predictor = AnomalyPredictor(model, "Industrial")
    folder = ImageFolder(validation, predictor.preprocessing)
    images = torch.stack([folder[index].image for index in range(len(folder))])
    labels = [int(folder[index].file.startswith("abnormal")) for index in range(len(folder))]
    with torch.no_grad():
        scores = predictor.predict(images, [CLASS] * len(folder)).image_score
    assert control["fp32"] == pytest.approx(100 * roc_auc_score(labels, scores), abs=1e-3)


def test_int8_beyond_its_bound_is_refused_and_writes_nothing(runs, tmp_path, monkeypatch, caplog):
    data_root, folders = runs
    validation = validation_folder(data_root, tmp_path)
    reached = iter([0.9, 0.8])  # fp32, then int8: ten points lost
    monkeypatch.setattr(export, "image_auroc", lambda compiled, items: next(reached))
    monkeypatch.setattr("nncf.quantize_with_accuracy_control", lambda model, *a, **k: model)
    out = tmp_path / "refused"
    argv = ["export", "--checkpoint", str(folders["aaclip"]), "--out", str(out)]
    argv += ["--format", "openvino", "--precision", "int8", "--validation_dir", str(validation)]
    argv += ["--calibration_dir", str(data_root / CLASS / "train" / "good")]
    assert predict.main([*argv, "--class_name", CLASS]) == 2
    message = caplog.records[-1].getMessage()
    assert "loses 10.00 points of image AUROC" in message and "--max_auroc_drop" in message
    assert not (out / "model.json").exists() and not (out / "model.xml").exists()
    assert predict.main([*argv[:8], "fp32", *argv[9:], "--class_name", CLASS]) == 2
    assert "--validation_dir controls int8's accuracy" in caplog.records[-1].getMessage()


def test_int8_needs_normal_images_and_bf16_a_native_cpu(runs, tmp_path, monkeypatch, caplog):
    data_root, folders = runs
    argv = ["export", "--checkpoint", str(folders["aaclip"]), "--format", "openvino"]
    assert predict.main([*argv, "--out", str(tmp_path / "a"), "--precision", "int8"]) == 2
    assert "--calibration_dir" in caplog.records[-1].getMessage()
    assert predict.main([*argv[:-2], "--format", "onnx", "--out", str(tmp_path / "b"),
                         "--precision", "int8"]) == 2  # fmt: skip
    assert "--format openvino alone" in caplog.records[-1].getMessage()
    monkeypatch.setattr(export, "native_bf16", lambda device: False)
    assert predict.main([*argv, "--out", str(tmp_path / "c"), "--precision", "bf16"]) == 2
    message = caplog.records[-1].getMessage()
    assert "computes bf16 natively" in message and "6.5x slower" in message
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before any work


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="needs a CPU with native bf16")
def test_a_bf16_graph_scores_close_to_fp32(runs, tmp_path):
    data_root, folders = runs
    normal = data_root / CLASS / "train" / "good"
    scores = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        argv = ["export", "--checkpoint", str(folders["aaclip"]), "--out", str(out)]
        argv += ["--format", "openvino", "--precision", precision, "--calibration_dir", str(normal)]
        assert predict.main(argv) == 0
        scored = tmp_path / f"scored_{precision}"
        argv = ["score", "--checkpoint", str(out), "--backend", "openvino", "--no-overlays"]
        argv += ["--input", str(data_root / CLASS / "test"), "--out", str(scored)]
        assert predict.main(argv) == 0
        scores[precision] = scores_of(scored)
    fp32, bf16 = (np.array([s[k] for k in sorted(s)]) for s in (scores["fp32"], scores["bf16"]))
    assert np.corrcoef(fp32, bf16)[0, 1] > 0.99


def test_a_multi_class_export_scores_each_class_as_its_own_and_test_py_evaluates_it(runs, tmp_path):
    data_root, folders = runs
    run = folders["aaclip"]
    together, alone = tmp_path / "together", tmp_path / "alone"
    argv = ["export", "--checkpoint", str(run), "--dataset", "Synthetic", "--data_root",
            str(data_root)]  # fmt: skip
    assert predict.main([*argv, "--out", str(together)]) == 0
    assert predict.main([*argv, "--class_name", "dots", "--out", str(alone)]) == 0
    info = json.loads((together / "model.json").read_text())
    assert [entry["name"] for entry in info["classes"]] == ["tile", "stripes", "dots"]
    assert info["inputs"] == ["image", "class_index"]
    several = ExportedPredictor(together, "onnxruntime")
    single = ExportedPredictor(alone, "onnxruntime")
    images = collate_items(
        [ImageFolder(data_root / "dots" / "test", several.preprocessing)[i] for i in range(6)]
    ).images
    mixed = ["dots", "tile", "dots", "stripes", "dots", "dots"]  # another class per image too
    got = several.predict(images, mixed)
    expected = single.predict(images, ["dots"] * 6)
    rows = [index for index, name in enumerate(mixed) if name == "dots"]
    torch.testing.assert_close(got.image_score[rows], expected.image_score[rows], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.anomaly_map[rows], expected.anomaly_map[rows], atol=1e-5, rtol=0)

    common = ["--data_root", str(data_root), "--device", "cpu"]
    assert test_script.main([*common, "--save_path", str(run), "--results_dir", str(tmp_path)]) == 0
    argv = [*common, "--backend", "onnxruntime", "--checkpoint", str(together)]
    assert test_script.main(argv) == 0
    reference = json.loads((tmp_path / "results_Synthetic.json").read_text())
    graph = json.loads((together / "results_Synthetic_onnxruntime.json").read_text())
    assert graph["meta"]["precision"] == "fp32" and graph["meta"]["backend"] == "onnxruntime"
    for name, metrics in reference["per_class"].items():
        for column, value in metrics.items():
            assert graph["per_class"][name][column] == pytest.approx(value, abs=1e-5), column


def test_sowa_deploys_its_k_shot_memory(runs, tmp_path):
    data_root, folders = runs
    out = tmp_path / "kshot"
    argv = ["export", "--checkpoint", str(folders["sowa"]), "--out", str(out), "--dataset",
            "Synthetic", "--data_root", str(data_root), "--class_name", CLASS, "--k_shot", "2",
            "--support_seed", "3"]  # fmt: skip
    assert predict.main(argv) == 0
    info = json.loads((out / "model.json").read_text())
    paths = draw_support("Synthetic", data_root, CLASS, 2, 3)
    assert info["k_shot"] == 2 and info["support"]["files"][CLASS] == [str(p) for p in paths]
    _, model, _ = load_trained_model(folders["sowa"])
    predictor = AnomalyPredictor(model, k_shot=2)
    predictor.set_support(load_images(paths, predictor.preprocessing))
    folder = ImageFolder(data_root / CLASS / "test", predictor.preprocessing)
    images = torch.stack([folder[index].image for index in (0, 9, 20)])
    names = ["gray textured tile"] * 3  # the prompt name (the class name works too)
    expected = predictor.predict(images, names)
    got = ExportedPredictor(out, "onnxruntime").predict(images, [CLASS] * 3)
    torch.testing.assert_close(got.image_score, expected.image_score, atol=1e-5, rtol=0)
    span = float(expected.anomaly_map.max() - expected.anomaly_map.min())
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, atol=1e-5 * span, rtol=0)


def test_a_tiled_k_shot_export_scores_as_tiled_torch_does(runs, tmp_path, one_line_error):
    """`export --tile`: the memory is encoded from support tiles, the shipped thresholds are
    calibrated on tiles of the graph, and scoring by other tiles (or none) is refused."""
    data_root, folders = runs
    normal = data_root / CLASS / "train" / "good"
    out = tmp_path / "tiled"
    tile = ["--tile", "48", "--tile_overlap", "0.25"]
    argv = ["export", "--checkpoint", str(folders["sowa"]), "--out", str(out), "--dataset",
            "Synthetic", "--data_root", str(data_root), "--class_name", CLASS, "--k_shot", "1",
            "--calibration_dir", str(normal), *tile]  # fmt: skip
    assert predict.main(argv) == 0
    info = json.loads((out / "model.json").read_text())
    tiling = {"tile": 48, "overlap": 0.25, "scale": 1.0}
    assert info["support"]["tiling"] == tiling
    assert json.loads((out / "calibration.json").read_text())["tiling"] == tiling
    config = TileConfig(tile=48, tile_overlap=0.25)
    _, model, _ = load_trained_model(folders["sowa"])
    torch_tiles = TiledPredictor(AnomalyPredictor(model, k_shot=1), config, 4)
    torch_tiles.set_support(
        torch_tiles.support_images(draw_support("Synthetic", data_root, CLASS, 1, 42))
    )
    graph_tiles = TiledPredictor(ExportedPredictor(out, "onnxruntime"), config, 4)
    image = read_image(sorted((data_root / CLASS / "test").rglob("*.png"))[-1])
    expected = torch_tiles.predict_image(image, CLASS)
    got = graph_tiles.predict_image(image, CLASS)
    assert got.image_score == pytest.approx(expected.image_score, abs=1e-5)
    span = float(expected.anomaly_map.max() - expected.anomaly_map.min())
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, atol=1e-5 * span, rtol=0)
    field = tmp_path / "field"
    field.mkdir()
    image.save(field / "a.png")
    argv = ["score", "--checkpoint", str(out), "--backend", "onnxruntime", "--input", str(field)]
    argv += ["--out", str(tmp_path / "scored"), "--device", "cpu"]
    assert predict.main([*argv, *tile]) == 0
    assert predict.main(argv) == 2  # the memory's patches are tiles: whole images are refused
    assert "encoded with --tile 48 --tile_overlap 0.25" in one_line_error()


def test_tiled_int8_feeds_are_tiles_and_accuracy_control_is_refused(runs, tmp_path, one_line_error):
    data_root, folders = runs
    normal = data_root / CLASS / "train" / "good"
    _, model, _ = load_trained_model(folders["aaclip"])
    predictor = AnomalyPredictor(model)
    preprocessing = predictor.preprocessing
    tiles = TiledPredictor(predictor, TileConfig(tile=48), 4)
    feeds = package.feeds(normal, tiles, 5)
    assert len(feeds) == 5
    limit = 3 * len(list_images(normal)) - 1  # 3 tiles per image, rounded up: one less
    assert len(package.feeds(normal, tiles, limit)) == limit
    assert all(
        feed["image"].shape == (1, 3, preprocessing.size, preprocessing.size) for feed in feeds
    )
    argv = ["export", "--checkpoint", str(folders["aaclip"]), "--out", str(tmp_path / "x")]
    argv += ["--format", "openvino", "--precision", "int8", "--calibration_dir", str(normal)]
    argv += ["--validation_dir", str(tmp_path), "--tile", "48"]
    assert predict.main(argv) == 2
    assert "--validation_dir measures image AUROC on whole images" in one_line_error()
    assert not (tmp_path / "x").exists()
