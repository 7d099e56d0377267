"""Export to ONNX and OpenVINO (predict.py export) and scoring with them (score --backend): for
each of the four models on the tiny backbone, the graph passes onnx.checker, runs in a fresh
process that imports only onnxruntime and numpy, and scores like the torch backend (scores within
1e-4, maps within 1e-3 of their range). Runs where the deployment extra is installed
(requirements-deploy.txt); skipped otherwise, apart from the errors that need none of it."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
import test as test_script
import train
from datasets.folder import ImageFolder
from datasets.items import collate_items
from models.registry import load_trained_model
from utils.core.errors import CheckpointError, ConfigError
from utils.deploy import export, package
from utils.inference.graph import ExportedPredictor, require
from utils.inference.predictor import AnomalyPredictor

REPO = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--training_mode", "few_shot", "--shot", "4"]
RUNS = {
    "aaclip": ["--text_epoch", "1", "--image_epoch", "1", "--text_batch_size", "4"],
    "feclip": ["--model", "feclip", "--epochs", "1", "--batch_size", "4"],
    "sowa": ["--model", "sowa", "--epochs", "1", "--batch_size", "4"],
}
CLASS = "tile"
LETTERBOX = {"feclip"}  # its graph takes the valid mask (masked LFS): the two-input export

FRESH = """
import sys
import numpy as np
import onnxruntime
folder = sys.argv[1]
session = onnxruntime.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
feed = {"image": np.load(sys.argv[2] + "/image.npy")}
if len(session.get_inputs()) == 2:
    feed["valid_mask"] = np.load(sys.argv[2] + "/valid_mask.npy")
anomaly_map, score = session.run(["anomaly_map", "image_score"], feed)
np.save(sys.argv[2] + "/map.npy", anomaly_map)
np.save(sys.argv[2] + "/score.npy", score)
ours = ("torch", "models", "utils", "datasets", "open_clip", "PIL")
print(sorted(name for name in sys.modules if name.split(".")[0] in ours))
"""


def installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


BACKENDS = [name for name in ("onnxruntime", "openvino") if installed(name)]


@pytest.fixture(scope="module")
def exports(python, tmp_path_factory, synthetic_root):
    """Per model: a short run, its calibration and its export (ONNX and, when installed,
    OpenVINO, from one trace). The four exports run as concurrent `predict.py export`
    processes: tracing is single-threaded Python, and there are two cores."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    root = tmp_path_factory.mktemp("deploy")
    data_root = root / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    runs = {}
    for name, extra in RUNS.items():
        runs[name] = root / name
        argv = ["--data_root", str(data_root), "--save_path", str(runs[name]), *FAST, *extra]
        assert train.main(argv) == 0
    runs["aaclip_cross_attn"] = root / "cross"
    argv = [
        "--model", "aaclip_cross_attn", "--save_path", str(runs["aaclip_cross_attn"]),
        "--load_base_text_adapter", str(runs["aaclip"] / "text_adapter.pth"),
        "--load_base_image_adapter", str(runs["aaclip"] / "image_adapter.pth"), "--device", "cpu",
    ]  # fmt: skip
    assert train.main(argv) == 0
    normal = data_root / CLASS / "train" / "good"
    folders, processes = {}, {}
    formats = ["onnx", *(["openvino"] if "openvino" in BACKENDS else [])]
    for name, run in runs.items():
        letterbox = ["--preprocess", "letterbox"] if name in LETTERBOX else []
        argv = ["calibrate", "--checkpoint", str(run), "--normal_dir", str(normal), *letterbox]
        assert predict.main([*argv, "--class_name", CLASS, "--device", "cpu"]) == 0
        folders[name] = root / f"{name}_export"
        argv = ["export", "--checkpoint", str(run), "--out", str(folders[name]), "--format"]
        processes[name] = subprocess.Popen(
            [python, REPO / "predict.py", *argv, *formats],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for name, process in processes.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
        assert f"exported {name} (fp32) for {CLASS!r}" in output
    return data_root, runs, folders


def read_scores(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def a_batch(data_root, preprocessing):
    """Five test images as the scoring loads them: `[5, 3, S, S]` and valid masks `[5, S, S]`."""
    folder = ImageFolder(data_root / CLASS / "test", preprocessing)
    batch = collate_items([folder[index] for index in (0, 3, 9, 17, 30)])
    return batch.images, batch.valid_mask


@pytest.mark.parametrize("name", ["aaclip", "aaclip_cross_attn", "feclip", "sowa"])
def test_export_matches_the_torch_backend(exports, name, tmp_path):
    import onnx

    data_root, runs, folders = exports
    folder = folders[name]
    onnx.checker.check_model(str(folder / "model.onnx"))
    info = json.loads((folder / "model.json").read_text())
    assert info["model"]["name"] == name and info["classes"] == [{"name": CLASS, "prompt": CLASS}]
    assert info["precision"] == "fp32" and sorted(info["files"]) == sorted(
        [*info["graphs"].values(), *(["model.bin"] if "openvino" in info["graphs"] else [])]
    )
    assert info["calibrations"][CLASS]["thresholds"] and info["k_shot"] == 0
    letterbox = name in LETTERBOX
    assert (info["preprocessing"]["geometry"] == "letterbox") is letterbox
    assert info["inputs"] == (["image", "valid_mask"] if letterbox else ["image"])

    overrides = {"preprocess": "letterbox"} if letterbox else {}  # the calibration's
    assert info["overrides"] == overrides  # recorded
    _, model, _ = load_trained_model(runs[name], overrides=overrides)
    predictor = AnomalyPredictor(model, info["domain"])
    assert info["preprocessing"] == predictor.preprocessing.to_dict()
    images, valid = a_batch(data_root, predictor.preprocessing)
    mask = valid if letterbox else None
    expected = predictor.predict(images, [CLASS] * len(images), mask)
    span = float(expected.anomaly_map.max() - expected.anomaly_map.min())
    for backend in BACKENDS:
        exported = ExportedPredictor(folder, backend)
        assert exported.preprocessing == predictor.preprocessing  # it applies exactly that
        read = ImageFolder(data_root / CLASS / "test", exported.preprocessing)[9]
        assert torch.equal(read.image, images[2]) and torch.equal(read.valid_mask, valid[2])
        got = exported.predict(images, [CLASS] * 5, mask)
        assert got.anomaly_map.shape == expected.anomaly_map.shape == (5, *images.shape[2:])
        torch.testing.assert_close(got.image_score, expected.image_score, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, atol=1e-3 * span, rtol=0)

    # The same scoring, thresholds and outputs through predict.py with each backend.
    test_dir = data_root / CLASS / "test"
    reference = None
    for backend in ("torch", *BACKENDS):
        checkpoint = runs[name] if backend == "torch" else folder
        out = tmp_path / backend
        argv = ["score", "--checkpoint", str(checkpoint), "--input", str(test_dir)]
        argv += ["--out", str(out), "--backend", backend, "--device", "cpu", "--no_overlays"]
        assert predict.main(argv) == 0
        rows = read_scores(out / "scores.csv")
        if reference is None:
            reference = rows
            continue
        assert [row["file"] for row in rows] == [row["file"] for row in reference]
        for row, ref in zip(rows, reference, strict=True):
            assert abs(float(row["image_score"]) - float(ref["image_score"])) <= 1e-4
            assert abs(float(row["map_score"]) - float(ref["map_score"])) <= 1e-3 * span
        assert (out / "index.html").is_file()

    # A fresh interpreter with onnxruntime and numpy only: no torch, no code of this project.
    np.save(tmp_path / "image.npy", images.numpy())
    np.save(tmp_path / "valid_mask.npy", valid.numpy())
    completed = subprocess.run(
        [sys.executable, "-c", FRESH, str(folder), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"  # nothing of torch, PIL or this repository
    np.testing.assert_allclose(
        np.load(tmp_path / "score.npy"), expected.image_score.numpy(), atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "map.npy"), expected.anomaly_map.numpy(), atol=1e-3 * span, rtol=0
    )


def test_an_export_refuses_another_class_or_preprocessing(
    exports, tmp_path, caplog, one_line_error
):
    data_root, _, folders = exports
    argv = ["score", "--checkpoint", str(folders["aaclip"]), "--backend", BACKENDS[0]]
    argv += ["--input", str(data_root / CLASS / "test"), "--out", str(tmp_path / "out")]
    assert predict.main([*argv, "--class_name", "wood"]) == 2
    message = one_line_error()
    assert "this export scores tile, not wood" in message and "--class_name" in message
    caplog.clear()
    assert predict.main([*argv, "--preprocess", "letterbox"]) == 2
    assert "an export's model and preprocessing are fixed; ['preprocess']" in one_line_error()


def test_cross_attention_both_and_missing_packages_are_one_line(tiny_clip, monkeypatch):
    from models.aaclip_cross_attn import AAClipCrossAttn as CrossAttentionModel

    config = dataclasses.replace(CrossAttentionModel.config_class(), cross_attn_at_test="both")
    with pytest.raises(ConfigError, match="runs the text tower per image"):
        export.ExportGraph(CrossAttentionModel(config, tiny_clip), "object", "Industrial")

    real = importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxruntime)
    with pytest.raises(ConfigError, match="pip install -r requirements-deploy.txt"):
        require("onnxruntime", "--backend onnxruntime")


def _copy_export(folders, tmp_path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(folders["aaclip"], folder)
    return folder


def _edit_info(folder: Path, edit) -> None:
    info = json.loads((folder / "model.json").read_text())
    edit(info)
    (folder / "model.json").write_text(json.dumps(info))


def _outside(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(b"x")
    return target


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (
            lambda f, t: (f / "model.json").write_text((f / "model.json").read_text()[:300]),
            "model.json cannot be read",
        ),
        (lambda f, t: _edit_info(f, lambda i: i.pop("classes")), "has no value for classes"),
        (lambda f, t: _edit_info(f, lambda i: i.update(k_shot="0")), "has a str for k_shot"),
        (
            lambda f, t: _edit_info(f, lambda i: i["graphs"].update(onnx="../x/model.onnx")),
            "inside its folder only",
        ),
        (
            lambda f, t: _edit_info(f, lambda i: i["graphs"].update(onnx=str(_outside(t)))),
            "inside its folder only",
        ),
        (
            lambda f, t: ((f / "model.onnx").unlink(), (f / "model.onnx").symlink_to(_outside(t))),
            "a link out of its folder",
        ),
        (
            lambda f, t: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes() + b"\0"),
            "model.onnx is not the file model.json records",
        ),
        (
            lambda f, t: _edit_info(f, lambda i: i["files"].update({"model.onnx": "0" * 64})),
            "export_id that is not the hash of its files",
        ),
        (
            lambda f, t: _edit_info(f, lambda i: i["preprocessing"].update(size=96)),
            "preprocesses to 96 px; the graph takes [64, 64]",
        ),
        (
            lambda f, t: _edit_info(f, lambda i: i["preprocessing"].update(geometry="letterbox")),
            "the graph takes no valid mask",
        ),
    ],
)
def test_an_export_proves_it_is_what_it_says(
    exports, tmp_path, one_line_error, monkeypatch, tamper, named
):
    data_root, _, folders = exports
    folder = _copy_export(folders, tmp_path)
    tamper(folder, tmp_path)
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda *args: pytest.fail("image read"))
    argv = ["score", "--checkpoint", str(folder), "--backend", BACKENDS[0], "--no_overlays"]
    argv += ["--input", str(data_root / CLASS / "test"), "--out", str(tmp_path / "out")]
    assert predict.main(argv) == 2
    message = one_line_error()
    assert named in message, message
    assert [file.name for file in (tmp_path / "out").iterdir()] == ["predict.log"]


def test_skip_hash_check_opens_an_edited_graph_and_says_so(exports, tmp_path, caplog):
    import onnx

    _, _, folders = exports
    folder = _copy_export(folders, tmp_path)
    graph = onnx.load(str(folder / "model.onnx"))
    graph.doc_string = "edited on purpose"
    onnx.save(graph, str(folder / "model.onnx"))
    with pytest.raises(CheckpointError, match="--skip_hash_check"):
        ExportedPredictor(folder, BACKENDS[0])
    ExportedPredictor(folder, BACKENDS[0], skip_hash_check=True)
    assert "--skip_hash_check: the files of" in caplog.text
    argv = ["score", "--checkpoint", str(folder), "--input", "x", "--out", "y", "--skip_hash_check"]
    assert predict.parse_args(argv)[1].skip_hash_check


def test_a_changed_mean_in_model_json_is_applied(exports, tmp_path):
    _, _, folders = exports
    folder = _copy_export(folders, tmp_path)
    _edit_info(folder, lambda info: info["preprocessing"].update(mean=[0.5, 0.5, 0.5]))
    assert ExportedPredictor(folder, BACKENDS[0]).preprocessing.mean == (0.5, 0.5, 0.5)


def test_an_export_replaces_its_folder_whole(
    exports, tmp_path, caplog, one_line_error, monkeypatch
):
    _, runs, folders = exports
    out = _copy_export(folders, tmp_path)  # export A: tile, with its calibration
    assert (out / "calibration.json").is_file()
    run = tmp_path / "run_b"  # the same weights without a calibration
    shutil.copytree(runs["aaclip"], run)
    (run / "calibration.json").unlink()
    argv = ["export", "--checkpoint", str(run), "--out", str(out), "--class_name", "wood"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    before = {path.name: path.read_bytes() for path in out.iterdir()}
    monkeypatch.setattr(package, "export_graph", interrupted)
    assert predict.main(argv) == 130  # interrupted: A stays whole, no temporary folder left
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "run_b"]
    monkeypatch.undo()

    assert predict.main(argv) == 0  # export B into A's folder
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == [{"name": "wood", "prompt": "wood"}] and info["calibrations"] == {}
    assert sorted(path.name for path in out.iterdir()) == ["model.json", "model.onnx"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "run_b"]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    argv[argv.index(str(out))] = str(tmp_path / "notes")
    caplog.clear()
    assert predict.main(argv) == 2
    assert "is not an export" in one_line_error()
    assert [path.name for path in (tmp_path / "notes").iterdir()] == ["mine.txt"]


def test_one_stream_gives_every_path_the_same_image_scores(exports, tmp_path):
    """The same files give the same per-image scores (within 1e-5, fp32) through test.py and
    predict.py score, the checkpoint in torch and its ONNX export, whole images and tiles: all
    eight read maps from the one prediction stream (`utils.inference.stream`)."""
    data_root, runs, folders = exports
    field_set = tmp_path / "field"  # one class as a Folder data set: test.py and score read it
    for kind, source in (("normal", "good"), ("abnormal", "blob")):
        (field_set / kind).mkdir(parents=True)
        for path in sorted((data_root / CLASS / "test" / source).glob("*.png"))[:3]:
            shutil.copy(path, field_set / kind / path.name)
    normal = data_root / CLASS / "train" / "good"
    sources = {
        "torch": ["--checkpoint", str(runs["feclip"]), "--preprocess", "letterbox"],
        "onnxruntime": ["--checkpoint", str(folders["feclip"]), "--backend", "onnxruntime"],
    }
    tilings = {"whole": [], "tiled": ["--tile", "48"]}
    common = ["--device", "cpu", "--class_name", CLASS]
    scores: dict[str, dict[str, float]] = {}
    for backend, source in sources.items():
        for tiling, tile in tilings.items():
            results = tmp_path / f"test_{backend}_{tiling}"
            argv = [*source, *tile, *common, "--dataset", "Folder", "--data_root", str(field_set)]
            assert test_script.main([*argv, "--results_dir", str(results)]) == 0
            (written,) = results.glob("results_Folder*.json")
            images = json.loads(written.read_text())["images"][CLASS]
            scores[f"test.py {backend} {tiling}"] = {
                image["file"]: image["score"] for image in images
            }
            calibration = tmp_path / f"calibration_{backend}_{tiling}.json"
            argv = ["calibrate", *source, *tile, *common, "--normal_dir", str(normal)]
            assert predict.main([*argv, "--output", str(calibration)]) == 0
            out = tmp_path / f"score_{backend}_{tiling}"
            argv = ["score", *source, *tile, *common, "--calibration", str(calibration)]
            assert predict.main([*argv, "--input", str(field_set), "--out", str(out)]) == 0
            scores[f"score {backend} {tiling}"] = {
                row["file"]: float(row["image_score"])
                for row in read_scores(out / "scores.csv")
            }
    reference = scores["test.py torch whole"]
    assert len(reference) == 6
    for tiling in tilings:
        tiled = scores[f"test.py torch {tiling}"]
        for path, values in scores.items():
            if path.endswith(tiling):
                assert values.keys() == tiled.keys(), path
                for name, value in values.items():
                    assert value == pytest.approx(tiled[name], abs=1e-5), (path, name)
    # tiles see other pixels than the whole image: the two geometries are not the same scores
    assert scores["test.py torch tiled"] != pytest.approx(reference, abs=1e-5)
