"""predict.py calibrate / score end to end on the tiny backbone and the synthetic set."""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from datasets.folder import ImageFolder
from datasets.preprocessing import Preprocessing
from models.registry import load_trained_model
from tests.utils.deploy.test_review import ReviewPage
from utils.deploy import calibration as calib
from utils.deploy.field import score_images
from utils.deploy.review import THUMBNAIL_SIDE
from utils.evaluation.metrics import auroc
from utils.inference.predictor import AnomalyPredictor

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
    """scores.csv's rows, with the `'` that guards a formula-like name taken off again."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["file"][:2] in {"'" + start for start in "=+-@\t\r"}:
            row["file"] = row["file"][1:]
    return rows


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
    overlay = Image.open(out / "overlays" / files[0].replace(".png", "_overlay.png"))
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
            overlay = out / "overlays" / f"{name.rsplit('.', 1)[0]}_overlay.png"
            assert Image.open(overlay).size == Image.open(folder / name).size
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


NASTY = '=1+2 "q" <b> & @x.png'  # quotes, markup, a spreadsheet formula's first character


@pytest.fixture(scope="module")
def reviewed(calibrated, tmp_path_factory):
    """A scored folder with labels and its review page: an unreadable file, a 400 x 200 image,
    two files of one stem (`good/000.jpg`, unlabelled, and `good/000.png`) and a name to escape.
    Returns the output folder, scores.csv's rows and the labels."""
    data_root, save_path, _ = calibrated
    folder = tmp_path_factory.mktemp("review") / "incoming"
    shutil.copytree(data_root / CLASS / "test", folder)
    (folder / "good" / "zz & broken.png").write_bytes(b"not an image")
    normal = _normal_image(data_root)
    normal.resize((400, 200)).save(folder / "good" / "wide.png")
    normal.save(folder / "good" / "000.jpg")
    normal.save(folder / NASTY)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.png"))
    labels = {name: int(not name.startswith("good/")) for name in files}
    labels_file = folder.parent / "labels.csv"
    with open(labels_file, "w", newline="") as handle:
        csv.writer(handle).writerows([("file", "label"), *labels.items()])
    out = folder.parent / "out"
    argv = ["score", "--checkpoint", str(save_path), "--input", str(folder), "--out", str(out)]
    assert predict.main([*argv, "--labels", str(labels_file), "--device", "cpu"]) == 0
    return out, _read_scores(out / "scores.csv"), labels


def _files(page: ReviewPage) -> list[str]:
    return [row["attrs"]["data-file"] for row in page.rows]


def test_the_review_page_lists_every_scored_file_and_is_self_contained(calibrated, reviewed):
    out, rows, _ = reviewed
    text = (out / "index.html").read_text()
    page = ReviewPage(text)
    assert sorted(_files(page)) == sorted(row["file"] for row in rows)
    kinds = {row["attrs"]["data-file"]: row["attrs"]["class"] for row in page.rows}
    for row in rows:
        assert kinds[row["file"]] == ("error" if row["error"] else row["decision"])
    assert kinds["good/zz & broken.png"] == "error"
    for source in page.links:  # every picture is a file here
        assert (out / unquote(source)).is_file(), source
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert not page.misnested and len(page.scripts) == 1
    calibration = calib.load_calibration(calibrated[1] / "calibration.json")
    assert f"{calibration['thresholds']['image']:.6g}" in text
    assert set(page.svgs) == {"heat colour scale", "ROC curves", "confusion matrix"}
    assert "AUROC" in "".join(page.svgs["ROC curves"])
    assert "TP " in "".join(page.svgs["confusion matrix"])
    details = [attrs for tag, attrs in page.elements if tag == "details"]
    assert len(details) == 1 and "open" not in details[0]  # the charts start folded away


def test_the_review_page_is_worst_first_with_each_margin_to_its_threshold(calibrated, reviewed):
    out, rows, _ = reviewed
    calibration = calib.load_calibration(calibrated[1] / "calibration.json")
    thresholds, stats = calibration["thresholds"], calibration["stats"]
    rule, reduction = calibration["rule"], calibration["reduction"]
    expected = {}
    for row in rows:
        if row["error"]:
            continue
        image = float(row["image_score"]) - thresholds["image"]
        pixel = float(row["map_score"]) - thresholds[reduction]
        scaled = [
            margin / (stats[name]["std"] if stats[name]["std"] > 0 else 1.0)
            for margin, name in ((image, "image"), (pixel, reduction))
        ]
        decisive = {"image": scaled[0], "pixel": scaled[1], "either": max(scaled)}
        decisive["both"] = min(scaled)
        expected[row["file"]] = (image, pixel, decisive[rule])
        assert (expected[row["file"]][2] > 0) == (row["decision"] == "anomalous"), row
    order = sorted(expected, key=lambda file: -expected[file][2])  # ties keep scores.csv's order
    order += [row["file"] for row in rows if row["error"]]

    page = ReviewPage((out / "index.html").read_text())
    assert _files(page) == order
    for position, name in enumerate(("image margin", "map margin", "decision margin (σ)")):
        for file, value in zip(order, page.values(name), strict=True):
            if file not in expected:
                assert value == "", (name, file)
                continue
            assert float(value) == pytest.approx(expected[file][position], rel=1e-9, abs=1e-12)
    header = page.headers[page.column("decision margin (σ)")]
    assert header["attrs"]["aria-sort"] == "descending" and "▼" in header["text"]
    assert sum("▼" in cell["text"] or "▲" in cell["text"] for cell in page.headers) == 1


def test_the_review_page_marks_each_labelled_row_tp_fp_fn_tn(reviewed):
    out, rows, labels = reviewed
    text = (out / "index.html").read_text()
    page = ReviewPage(text)
    by_file = {row["file"]: row for row in rows}
    names = {(1, True): "TP", (0, True): "FP", (1, False): "FN", (0, False): "TN"}
    marks, label_texts = [], []
    for file in _files(page):
        row, label = by_file[file], labels.get(file)
        if row["error"] or label is None:
            marks.append("")
            label_texts.append("")
            continue
        marks.append(names[label, row["decision"] == "anomalous"])
        label_texts.append(("normal", "anomalous")[label])
    assert page.values("mark") == marks and page.values("label") == label_texts
    assert marks[_files(page).index("good/000.jpg")] == ""  # not in labels.csv
    report = json.loads((out / "report.json").read_text())["at_thresholds"]
    buttons = re.findall(r'data-mark-filter="(\w+)" aria-pressed="\w+">(\w+) \((\d+)\)', text)
    assert [(key, name, int(count)) for key, name, count in buttons] == [
        (key, key.upper(), report[key]) for key in ("tp", "fp", "fn", "tn")
    ]
    assert sum(map(bool, marks)) == sum(report[key] for key in ("tp", "fp", "fn", "tn"))


def test_the_review_pictures_are_bounded_named_by_stem_and_every_name_escaped(reviewed):
    out, rows, _ = reviewed
    text = (out / "index.html").read_text()
    page = ReviewPage(text)
    written = [path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()]
    assert not [path for path in written + page.links if ".png.png" in path]
    for path in out.glob("thumbnails/**/*.png"):
        assert max(Image.open(path).size) <= THUMBNAIL_SIDE, path
    for picture in ("thumbnails/good/wide.png", "thumbnails/good/wide_overlay.png"):
        assert Image.open(out / picture).size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE // 2)
    assert Image.open(out / "overlays/good/wide_overlay.png").size == (400, 200)

    pictures = {
        row["attrs"]["data-file"]: [unquote(link) for link in row["links"]] for row in page.rows
    }
    assert pictures["good/zz & broken.png"] == []
    bases = {}
    for file, links in pictures.items():
        if not links:
            continue
        link, thumbnail, link_again, heat = links
        base = thumbnail.removeprefix("thumbnails/").removesuffix(".png")
        assert link == link_again == f"overlays/{base}_overlay.png"
        assert heat == f"thumbnails/{base}_overlay.png"
        bases[file] = base
    assert bases["good/000.jpg"] == "good/000" and bases["good/000.png"] == "good/000_png"
    assert bases[NASTY] == NASTY.removesuffix(".png") and bases["blob/000.png"] == "blob/000"
    assert len({base.lower() for base in bases.values()}) == len(bases) == len(rows) - 1

    assert NASTY in _files(page) and html.escape(NASTY) in text and "<b>" not in text
    assert f'aria-label="verdict on {html.escape(NASTY)}"' in text


def _chromium(*args: str) -> subprocess.CompletedProcess:
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    return subprocess.run(
        [*browser, "--window-size=1400,1000", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _variant(page: Path, to: Path, head: str = "", end: str = "") -> Path:
    """A copy of the page at `to` that finds its pictures beside `page`, with `head` added to its
    head and `end` before </body>."""
    base = f'<head><base href="{page.parent.as_uri()}/">{head}'
    text = page.read_text().replace("<head>", base, 1).replace("</body>", f"{end}</body>", 1)
    to.write_text(text)
    return to


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH")
def test_the_review_page_shows_its_first_rows_above_the_fold_in_chromium(
    calibrated, reviewed, tmp_path
):
    """At 1400 x 1000, with labels and without: the screenshot is drawn, it differs from the
    same page with its rows hidden from a line in the upper half on, and the first three rows end
    above the bottom edge."""
    out, _, _ = reviewed
    plain = tmp_path / "plain"
    argv = ["score", "--checkpoint", str(calibrated[1]), "--input", str(out.parent / "incoming")]
    assert predict.main([*argv, "--out", str(plain), "--device", "cpu", "--no_overlays"]) == 0
    hide_rows = "<style>#rows tbody { visibility: hidden; }</style>"
    probe = (
        "<script>document.body.dataset.bottoms = Array.from(document.querySelectorAll("
        "'#rows tbody tr'), row => row.getBoundingClientRect().bottom).slice(0, 3).join(' ');"
        "</script>"
    )
    for name, page in (("labelled", out / "index.html"), ("plain", plain / "index.html")):
        shots = {}
        for variant, head in (("full", ""), ("summary", hide_rows)):
            shot = tmp_path / f"{name}_{variant}.png"
            _chromium(
                f"--screenshot={shot}",
                _variant(page, tmp_path / f"{shot.stem}.html", head).as_uri(),
            )
            shots[variant] = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        full, summary = shots["full"], shots["summary"]
        assert full.shape == (1000, 1400) and full.std() > 20, name  # drawn, not a blank page
        differs = np.flatnonzero(np.abs(full - summary).max(axis=1) > 40)  # lines showing rows
        assert differs.size > 200 and differs[0] < 500, (name, differs[:1], differs.size)
        copy = _variant(page, tmp_path / f"{name}_probe.html", end=probe)
        body = next(
            a
            for tag, a in ReviewPage(_chromium("--dump-dom", copy.as_uri()).stdout).elements
            if tag == "body"
        )
        bottoms = [float(value) for value in body["data-bottoms"].split()]
        assert len(bottoms) == 3 and max(bottoms) < 1000, (name, bottoms)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH")
def test_the_review_page_follows_its_hash_and_falls_back_on_a_malformed_one_in_chromium(
    reviewed, tmp_path
):
    out, rows, labels = reviewed
    url = (out / "index.html").as_uri()
    order = _files(ReviewPage((out / "index.html").read_text()))

    def view(address: str) -> tuple[ReviewPage, str]:
        result = _chromium("--enable-logging=stderr", "--v=0", "--dump-dom", address)
        assert "Uncaught" not in result.stderr, result.stderr
        return ReviewPage(result.stdout), result.stdout

    def shown(page: ReviewPage) -> list[str]:
        return [row["attrs"]["data-file"] for row in page.rows if "hidden" not in row["attrs"]]

    malformed = ["", "#sort=abc", "#sort=99&order=sideways", "#sort=0", "#sort=1e3&filter=%3Cb%3E"]
    for fragment in (*malformed, "#mark=%E0%A4%A&filter=", "#%%=&&sort"):
        page, _ = view(url + fragment)
        assert _files(page) == order and shown(page) == order, fragment
    page, _ = view(url + "#sort=2&order=asc")
    scores = [float(value) if value else -math.inf for value in page.values("image score")]
    assert scores == sorted(scores)
    assert page.headers[2]["attrs"]["aria-sort"] == "ascending" and "▲" in page.headers[2]["text"]
    page, _ = view(url + "#filter=anomalous")
    decided = {row["file"]: row["decision"] for row in rows}
    assert shown(page) == [file for file in order if decided[file] == "anomalous"]
    page, _ = view(url + "#mark=fp")
    false_alarms = [f for f in order if decided[f] == "anomalous" and labels.get(f) == 0]
    assert shown(page) == false_alarms

    run = next(a["data-run"] for tag, a in page.elements if a.get("id") == "rows")
    key = json.dumps(json.dumps(["anomaly-review", run, NASTY], separators=(",", ":")))
    seed = (
        f'<script>localStorage.setItem({key}, \'{{"verdict": "override", "at": "t"}}\');</script>'
    )
    page, dumped = view(_variant(out / "index.html", tmp_path / "seeded.html", seed).as_uri())
    verdicts = {row["attrs"]["data-file"]: row["attrs"].get("data-verdict") for row in page.rows}
    assert verdicts[NASTY] == "override" and '<span id="verdicts">1</span>' in dumped


def _no_nan(name: str) -> None:
    raise AssertionError(f"bare {name} in a JSON file")


def test_formula_like_names_are_quoted_in_the_csv_and_the_report_has_no_nan(calibrated, tmp_path):
    data_root, save_path, _ = calibrated
    folder = tmp_path / "incoming"
    folder.mkdir()
    names = ["=HYPERLINK(1).png", "+1.png", "-cmd.png", "@sum.png", "plain.png"]
    for name in names:
        _normal_image(data_root).save(folder / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{name},0\n" for name in names))  # one class
    out = tmp_path / "out"
    argv = ["score", "--checkpoint", str(save_path), "--input", str(folder), "--out", str(out)]
    assert predict.main([*argv, "--labels", str(labels), "--device", "cpu"]) == 0
    with open(out / "scores.csv", newline="") as handle:
        cells = {row["file"]: row for row in csv.DictReader(handle)}
    assert sorted(cells) == sorted(f"'{name}" if name[0] in "=+-@" else name for name in names)
    assert all(
        row["image_z"] == "" or float(row["image_z"]) == float(row["image_z"])
        for row in cells.values()
    )  # numbers, negative ones too, stay numbers
    report = json.loads((out / "report.json").read_text(), parse_constant=_no_nan)
    assert report["ranking"]["image_score"]["auroc"] is None  # undefined with one label: null


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["thresholds"].update(image=float("nan")), "thresholds.image is nan"),
        (lambda c: c["thresholds"].update(image=float("inf")), "thresholds.image is inf"),
        (lambda c: c["thresholds"].update(image="0.5"), "thresholds.image is '0.5'"),
        (lambda c: c.pop("stats"), "stats.image.mean is missing"),
        (lambda c: c.update(rule="majority"), "rule is 'majority'"),
    ],
)
def test_a_calibration_that_cannot_decide_is_one_line_before_any_image(
    calibrated, tmp_path, monkeypatch, one_line_error, edit, named
):
    data_root, save_path, _ = calibrated
    calibration = json.loads((save_path / "calibration.json").read_text())
    edit(calibration)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(calibration))
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda *args: pytest.fail("image read"))
    argv = ["score", "--checkpoint", str(save_path), "--calibration", str(path), "--device", "cpu"]
    out = tmp_path / "out"
    assert predict.main([*argv, "--input", str(data_root / CLASS / "test"), "--out", str(out)]) == 2
    message = one_line_error()
    assert named in message and "recalibrate" in message
    assert [file.name for file in out.iterdir()] == ["predict.log"]  # the run's log only
    assert sorted(file.name for file in tmp_path.iterdir()) == ["edited.json", "out"]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (None, "does not exist"),
        ("name,value\ngood/000.png,0\n", "header with columns file,label"),
        ("file,label\ngood/000.png,2\n", "is not 0 or 1"),
        ("file,label\nelsewhere/x.png,1\n", "has a label in"),
    ],
)
def test_labels_are_checked_before_any_image(
    calibrated, tmp_path, monkeypatch, one_line_error, content, named
):
    data_root, save_path, _ = calibrated
    labels = tmp_path / "labels.csv"
    if content is not None:
        labels.write_text(content)
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda *args: pytest.fail("image read"))
    out = tmp_path / "out"
    argv = ["score", "--checkpoint", str(save_path), "--labels", str(labels), "--device", "cpu"]
    assert predict.main([*argv, "--input", str(data_root / CLASS / "test"), "--out", str(out)]) == 2
    assert named in one_line_error()
    assert [file.name for file in out.iterdir()] == ["predict.log"]
