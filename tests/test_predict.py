"""predict.py calibrate / score end to end on the tiny backbone and the synthetic set."""

from __future__ import annotations

import csv
import html
import json
import logging
import re
import shutil
import subprocess
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from datasets.folder import ImageFolder
from datasets.preprocessing import Preprocessing
from models.predictor import AnomalyPredictor
from models.registry import load_trained_model
from utils.deploy import calibration as calib
from utils.deploy.field import score_images
from utils.evaluation.metrics import auroc

CLASS = "tile"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_root):
    """A short AA-CLIP run (about 3 s) on a private copy of the synthetic set."""
    data_root = tmp_path_factory.mktemp("predict") / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    save_path = data_root.parent / "run"
    argv = ["--data_root", str(data_root), "--save_path", str(save_path), "--device", "cpu"]
    argv += ["--text_epoch", "1", "--image_epoch", "1", "--shot", "4"]
    assert train.main(argv) == 0
    return data_root, save_path


@pytest.fixture(scope="module")
def calibrated(checkpoint):
    data_root, save_path = checkpoint
    normal_dir = data_root / CLASS / "train" / "good"
    argv = ["calibrate", "--checkpoint", str(save_path), "--normal_dir", str(normal_dir)]
    assert predict.main([*argv, "--device", "cpu", "--batch_size", "3"]) == 0
    return data_root, save_path, normal_dir


def _read_scores(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_calibration_thresholds_are_numpy_percentiles_of_the_normal_scores(calibrated):
    _, save_path, normal_dir = calibrated
    calibration = calib.load_calibration(save_path / "calibration.json")
    _, model, _ = load_trained_model(save_path)
    predictor = AnomalyPredictor(model)
    dataset = ImageFolder(normal_dir, predictor.preprocessing)
    results = [result for _, result in score_images(predictor, dataset, "object")]
    p = calibration["percentile"]
    assert p == 99.5
    image_scores = np.array([result["image_score"] for result in results])
    np.testing.assert_allclose(
        calibration["thresholds"]["image"], np.percentile(image_scores, p), rtol=1e-6
    )
    for name in calib.REDUCTIONS:
        values = np.array([result[name] for result in results])
        np.testing.assert_allclose(
            calibration["thresholds"][name], np.percentile(values, p), rtol=1e-6
        )
    assert calibration["data"]["count"] == len(dataset) == 8
    assert calibration["data"]["files_sha256"] == calib.files_digest(
        [dataset.relative_name(index) for index in range(len(dataset))]
    )
    assert calibration["model"]["name"] == "aaclip"
    assert calibration["model"]["config"]["model_name"] == "tiny"
    assert calibration["preprocessing"] == predictor.preprocessing.to_dict()
    assert calibration["preprocessing"]["geometry"] == "square"
    assert calibration["class_name"] == "object" and calibration["overrides"] == {}
    assert calibration["created"]


def test_end_to_end_report_auroc_equals_the_shared_metric(calibrated, tmp_path, capsys):
    data_root, save_path, _ = calibrated
    test_dir = data_root / CLASS / "test"
    labels = tmp_path / "labels.csv"
    files = sorted(path.relative_to(test_dir).as_posix() for path in test_dir.rglob("*.png"))
    labels.write_text(
        "file,label\n" + "".join(f"{name},{int(not name.startswith('good/'))}\n" for name in files)
    )
    out = tmp_path / "out"
    argv = ["score", "--checkpoint", str(save_path), "--input", str(test_dir), "--out", str(out)]
    assert predict.main([*argv, "--labels", str(labels), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| image_score |" in printed and "predicted anomalous" in printed

    rows = _read_scores(out / "scores.csv")
    assert [row["file"] for row in rows] == files
    assert all(row["decision"] in ("normal", "anomalous") and not row["error"] for row in rows)
    assert {row["fired"] for row in rows} <= {"image", "pixel", "both", "none"}
    truth = np.array([int(not row["file"].startswith("good/")) for row in rows])
    scores = np.array([float(row["image_score"]) for row in rows])
    report = json.loads((out / "report.json").read_text())
    assert report["ranking"]["image_score"]["auroc"] == pytest.approx(
        auroc(scores, truth), abs=1e-9
    )
    matrix = report["at_thresholds"]
    decided = np.array([row["decision"] == "anomalous" for row in rows])
    assert matrix["tp"] == int((decided & (truth == 1)).sum())
    assert matrix["fp"] == int((decided & (truth == 0)).sum())
    assert (out / "report.md").is_file()
    overlay = Image.open(out / "overlays" / f"{files[0]}.png")
    assert overlay.size == Image.open(test_dir / files[0]).size


def _normal_image(data_root) -> Image.Image:
    return Image.open(sorted((data_root / CLASS / "train" / "good").glob("*.png"))[0]).convert(
        "RGB"
    )


def test_bad_files_are_reported_and_the_rest_scored(calibrated, tmp_path):
    data_root, save_path, _ = calibrated
    folder = tmp_path / "incoming"
    folder.mkdir()
    image = _normal_image(data_root)
    image.save(folder / "a_rgb.png")
    image.convert("L").save(folder / "b_gray.png")
    deep = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "c_16bit.png")
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "d_rgba.png")
    (folder / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    image.crop((0, 0, 96, 50)).save(folder / "f_wide.JPG")
    out = tmp_path / "out"
    argv = ["score", "--checkpoint", str(save_path), "--input", str(folder), "--out", str(out)]
    assert predict.main([*argv, "--device", "cpu", "--preprocess", "letterbox"]) == 0
    rows = {row["file"]: row for row in _read_scores(out / "scores.csv")}
    assert sorted(rows) == ["a_rgb.png", "b_gray.png", "c_16bit.png", "d_rgba.png",
                            "e_corrupt.png", "f_wide.JPG"]  # fmt: skip
    assert "cannot read image" in rows["e_corrupt.png"]["error"]
    assert rows["e_corrupt.png"]["image_score"] == "" and rows["e_corrupt.png"]["decision"] == ""
    for name, row in rows.items():
        if name != "e_corrupt.png":
            assert row["error"] == "" and np.isfinite(float(row["image_score"])), name
            assert (
                Image.open(out / "overlays" / f"{name}.png").size == Image.open(folder / name).size
            )
    # the 16-bit copy is the 8-bit grayscale scaled by 257: it reads back as the same picture
    assert rows["c_16bit.png"]["image_score"] == rows["b_gray.png"]["image_score"]


def test_empty_folder_is_a_one_line_error(calibrated, tmp_path, caplog):
    _, save_path, _ = calibrated
    (tmp_path / "empty").mkdir()
    argv = ["score", "--checkpoint", str(save_path), "--input", str(tmp_path / "empty")]
    with caplog.at_level(logging.ERROR):
        assert predict.main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "holds no images" in errors[0] and "\n" not in errors[0]
    argv = ["calibrate", "--checkpoint", str(save_path), "--normal_dir", str(tmp_path / "empty")]
    assert predict.main([*argv, "--output", str(tmp_path / "cal.json")]) == 2
    assert not (tmp_path / "cal.json").exists()


def test_letterbox_padding_never_raises_a_score(calibrated, tmp_path):
    """A 64 x 32 normal image letterboxed to 64 px (scale 1: no resampling) and its white-padded
    64 x 64 copy feed the model the same pixels; letterboxed, the padding is excluded from the
    reductions, so they can only be lower, and the image decision is the same."""
    data_root, save_path, _ = calibrated
    calibration = calib.load_calibration(save_path / "calibration.json")
    _, model, _ = load_trained_model(save_path)
    assert model.img_size == 64
    for folder in ("original", "padded"):
        (tmp_path / folder).mkdir()
    small = _normal_image(data_root).resize((64, 32), Image.Resampling.BICUBIC)
    small.save(tmp_path / "original" / "x.png")
    padded = Image.new("RGB", (64, 64), (255, 255, 255))
    padded.paste(small, (0, 16))
    padded.save(tmp_path / "padded" / "x.png")

    letterboxed = ImageFolder(tmp_path / "original", Preprocessing(64, "letterbox"))
    plain = ImageFolder(tmp_path / "padded", Preprocessing(64))
    torch.testing.assert_close(letterboxed[0].image, plain[0].image, rtol=0, atol=0)
    assert int(letterboxed[0].valid_mask.sum()) == 64 * 32 and plain[0].valid_mask.all()

    predictor = AnomalyPredictor(model)
    ((_, unmasked),) = score_images(predictor, plain, "object", top_fraction=0.01)
    predictor.preprocessing = letterboxed.preprocessing  # as --preprocess letterbox sets it
    ((_, masked),) = score_images(predictor, letterboxed, "object", top_fraction=0.01)
    assert masked["image_score"] == unmasked["image_score"]
    for name in calib.REDUCTIONS:
        assert masked[name] <= unmasked[name]
    decisions = {}
    for key, result in (("masked", masked), ("unmasked", unmasked)):
        for rule in ("image", "pixel"):
            decided, _ = calib.decide(
                calibration, np.array([result["image_score"]]), np.array([result["max"]]), rule
            )
            decisions[key, rule] = bool(decided[0])
    assert decisions["masked", "image"] == decisions["unmasked", "image"]
    assert decisions["masked", "pixel"] <= decisions["unmasked", "pixel"]


class _RecordingModel(torch.nn.Module):
    """Answers the models' `predict` and records the valid mask it was given."""

    img_size = 16
    name = "stub"
    supports_memory = False
    device = torch.device("cpu")

    def __init__(self, geometry: str) -> None:
        super().__init__()
        self.masks: list[torch.Tensor | None] = []
        self.geometry = geometry

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(16, self.geometry)

    def class_text(self, prompt_name):
        return None

    def predict(self, images, class_names, valid_mask=None, *, text=None, memory=None, domain=""):
        self.masks.append(valid_mask)
        batch = images.shape[0]
        return torch.rand(batch, 16, 16), torch.rand(batch)


def test_valid_mask_goes_to_the_model_for_letterboxed_images_only(tmp_path):
    Image.new("RGB", (32, 8), (10, 20, 30)).save(tmp_path / "wide.png")
    for geometry in ("letterbox", "square"):
        model = _RecordingModel(geometry)
        predictor = AnomalyPredictor(model)
        dataset = ImageFolder(tmp_path, predictor.preprocessing)
        ((_, result),) = score_images(predictor, dataset, "object")
        if geometry == "letterbox":
            torch.testing.assert_close(model.masks[0], dataset[0].valid_mask[None])
            assert int(model.masks[0].sum()) == 16 * 4
        else:
            assert model.masks == [None]
        assert np.isfinite(result["max"])


@pytest.fixture(scope="module")
def reviewed(calibrated, tmp_path_factory):
    """A scored folder with labels and one unreadable file, and its review page."""
    data_root, save_path, _ = calibrated
    folder = tmp_path_factory.mktemp("review") / "incoming"
    shutil.copytree(data_root / CLASS / "test", folder)
    (folder / "good" / "zz & broken.png").write_bytes(b"not an image")
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.png"))
    labels = folder.parent / "labels.csv"
    labels.write_text(
        "file,label\n" + "".join(f"{name},{int(not name.startswith('good/'))}\n" for name in files)
    )
    out = folder.parent / "out"
    argv = ["score", "--checkpoint", str(save_path), "--input", str(folder), "--out", str(out)]
    assert predict.main([*argv, "--labels", str(labels), "--device", "cpu"]) == 0
    return out, _read_scores(out / "scores.csv")


def test_the_review_page_lists_every_scored_file_and_is_self_contained(calibrated, reviewed):
    out, rows = reviewed
    page = (out / "index.html").read_text()
    body = page.split("<tbody>")[1].split("</tbody>")[0]
    cells = re.findall(r'<tr class="(\w+)"><td>(.*?)</td><td>(.*?)</td>', body)
    assert [html.unescape(file) for _, _, file in cells] == [row["file"] for row in rows]
    kinds = {html.unescape(file): kind for kind, _, file in cells}
    for row in rows:
        assert kinds[row["file"]] == ("error" if row["error"] else row["decision"])
    assert kinds["good/zz & broken.png"] == "error"
    for source in re.findall(r'(?:src|href)="([^"]+)"', page):  # every picture is a file here
        assert (out / unquote(source)).is_file(), source
    assert "http://" not in page and "https://" not in page and "<link" not in page
    calibration = calib.load_calibration(calibrated[1] / "calibration.json")
    assert f"{calibration['thresholds']['image']:.6g}" in page
    assert page.count("<svg") == 2 and "AUROC" in page and "TP " in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH")
def test_the_review_page_renders_in_chromium(reviewed, tmp_path):
    out, rows = reviewed
    url = (out / "index.html").as_uri()
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "review.png"
    subprocess.run(
        [*browser, "--window-size=1280,1400", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    picture = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert picture.shape == (1400, 1280) and picture.std() > 20  # drawn, not a blank page
    dom = subprocess.run(
        [*browser, "--dump-dom", f"{url}#filter=anomalous"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    hidden = len(re.findall(r'<tr class="(?:normal|error)" hidden', dom))
    shown = len(re.findall(r'<tr class="anomalous">', dom))
    assert shown == sum(row["decision"] == "anomalous" for row in rows)
    assert hidden == len(rows) - shown
