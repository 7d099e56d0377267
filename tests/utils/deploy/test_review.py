"""The review page's pieces: picture names, the heat thumbnail and its contour, the ROC axes,
margins and marks on a page written from hand-made rows, and its script's syntax."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pytest
from PIL import Image

import utils.deploy.review as review
from datasets.preprocessing import Preprocessing
from utils.deploy import calibration as calib
from utils.deploy.review import (
    THUMBNAIL_SIDE,
    margins,
    picture_names,
    roc_svg,
    save_heat_thumbnail,
    write_review,
)

_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "wbr",
}


class ReviewPage(HTMLParser):
    """A review page (or a browser's dump of it) parsed: header cells, body rows (attributes,
    cells, links), links, the texts of each SVG by its aria-label, scripts, every element's
    attributes, and where an element did not close in order."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.headers: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.links: list[str] = []
        self.svgs: dict[str, list[str]] = {}
        self.scripts: list[str] = []
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.misnested: list[str] = []
        self._stack: list[str] = []
        self._section = ""
        self._rows_table = False
        self._cell: dict[str, Any] | None = None
        self._svg: str | None = None
        self.feed(text)
        self.close()

    def _open(self, tag: str, attrs: list[tuple[str, str | None]], closes: bool) -> None:
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        links = [attributes[key] or "" for key in ("src", "href") if key in attributes]
        self.links += links
        if self._section == "tbody" and self.rows:
            self.rows[-1]["links"] += links
        if not closes:
            self._stack.append(tag)
        if tag == "table":  # the rows table; a browser adds <tbody> to the summary's tables
            self._rows_table = attributes.get("id") == "rows"
        elif tag in ("thead", "tbody") and self._rows_table:
            self._section = tag
        elif tag == "tr" and self._section == "tbody":
            self.rows.append({"attrs": attributes, "cells": [], "links": []})
        elif tag in ("th", "td") and self._section:
            self._cell = {"attrs": attributes, "text": ""}
            target = self.headers if self._section == "thead" else self.rows[-1]["cells"]
            target.append(self._cell)
        elif tag == "svg":
            self._svg = attributes.get("aria-label") or ""
            self.svgs[self._svg] = []
        elif tag == "script":
            self.scripts.append("")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open(tag, attrs, closes=tag in _VOID)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open(tag, attrs, closes=True)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if not self._stack or self._stack[-1] != tag:
            self.misnested.append(f"</{tag}> closes {self._stack[-1:] or 'nothing'}")
            return
        self._stack.pop()
        if tag in ("th", "td"):
            self._cell = None
        elif tag in ("thead", "tbody"):
            self._section = ""
        elif tag == "svg":
            self._svg = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data
        if self._svg is not None and self._stack[-1:] == ["text"]:
            self.svgs[self._svg].append(data)
        if self._stack[-1:] == ["script"]:
            self.scripts[-1] += data

    def column(self, name: str) -> int:
        """The index of the header named `name` (sort arrows aside)."""
        names = [cell["text"].strip(" ▲▼") for cell in self.headers]
        return names.index(name)

    def values(self, name: str) -> list[str]:
        """Each row's data-value (or text) in the column `name`, in page order."""
        index = self.column(name)
        return [
            row["cells"][index]["attrs"].get("data-value", row["cells"][index]["text"])
            for row in self.rows
        ]


def _calibration(rule: str = "image") -> dict[str, Any]:
    rng = np.random.default_rng(0)
    reductions = {name: rng.normal(1.0, 0.2, 50) for name in ("max", "topk_mean", "mean")}
    calibration = calib.calibrate(rng.uniform(0, 0.5, 50), reductions, 95.0, "max", 0.01, rule)
    calibration |= {"model": {"name": "aaclip"}, "data": {"count": 50, "folder": "normal"}}
    return calibration | {"created": "2025-01-01T00:00:00+00:00"}


def _row(file: str, image: float, pixel: float, calibration: dict[str, Any]) -> dict[str, Any]:
    decision, fired = calib.decide(calibration, np.array([image]), np.array([pixel]))
    stats = calibration["stats"]
    return {
        "file": file,
        "image_score": f"{image:.8g}",
        "image_z": f"{calib.z_score(image, stats['image']):.6g}",
        "map_score": f"{pixel:.8g}",
        "map_z": f"{calib.z_score(pixel, stats['max']):.6g}",
        "decision": "anomalous" if decision[0] else "normal",
        "fired": fired[0],
        "error": "",
    }


SETTINGS = {
    "backend": "torch",
    "reduction": "max",
    "class_name": "object",
    "domain": "Industrial",
    "preprocessing": "square (pil resize)",
}


def test_pictures_are_named_by_the_stem_and_stay_unique():
    files = ["a.jpg", "a.png", "A.PNG", "a_overlay.png", "c.png", "c_png.png", "c.PNG"]
    files += ["x.jpg", "x.png/y.png", "sub/a.png"]
    names = picture_names(files)
    bases = {
        file: pictures.thumbnail.removeprefix("thumbnails/") for file, pictures in names.items()
    }
    assert bases == {
        "a.jpg": "a.png",
        "a.png": "a_png.png",
        "A.PNG": "A_PNG_2.png",  # "a_png" is taken, in any case
        "a_overlay.png": "a_overlay_png.png",  # "a_overlay" is a.jpg's heat picture
        "c.png": "c.png",
        "c_png.png": "c_png.png",
        "c.PNG": "c_PNG_2.png",
        "x.jpg": "x_jpg.png",  # x.png is a folder of pictures
        "x.png/y.png": "x.png/y.png",
        "sub/a.png": "sub/a.png",
    }
    for file, pictures in names.items():
        base = bases[file].removesuffix(".png")
        assert pictures.heat == f"thumbnails/{base}_overlay.png"
        assert pictures.overlay == f"overlays/{base}_overlay.png"
    written = [path.lower() for pictures in names.values() for path in pictures[:2]]
    assert len(set(written)) == len(written)
    assert not any(".png.png" in path for pictures in names.values() for path in pictures)


@pytest.mark.parametrize("geometry", ["letterbox", "short_side_crop"])
def test_the_heat_thumbnail_is_drawn_small_with_the_threshold_contour(
    geometry, tmp_path, monkeypatch
):
    """A 1000 x 500 image, a square of the map above T_max and the letterbox padding far above
    it: the thumbnail is at most THUMBNAIL_SIDE, the colour overlay is never built larger, the
    contour outlines the square alone (the padding is cropped away)."""
    calibration = {"thresholds": {"max": 1.0}, "stats": {"mean": {"median": 0.0}}}
    place = Preprocessing(64, geometry).geometry_of(1000, 500)
    anomaly_map = np.zeros((64, 64), np.float32)
    anomaly_map[~place.valid_mask().numpy()] = 5.0
    anomaly_map[24:40, 24:40] = 2.0
    shapes, draw = [], review.overlay

    def recording(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
        shapes.append(image.shape)
        return draw(image, heat)

    monkeypatch.setattr(review, "overlay", recording)
    image = np.full((500, 1000, 3), 128, np.uint8)
    save_heat_thumbnail(tmp_path / "heat.png", image, anomaly_map, place, calibration)

    picture = np.asarray(Image.open(tmp_path / "heat.png").convert("RGB"))
    side = THUMBNAIL_SIDE
    expected = (side // 2, side) if geometry == "letterbox" else (side, side)  # 2:1, or its square
    assert picture.shape[:2] == expected and shapes == [(*expected, 3)]
    scale = expected[1] / place.content_width
    top, left = (24 - place.top) * scale, (24 - place.left) * scale
    rows, columns = np.nonzero((picture == review.CONTOUR_COLOR).all(axis=-1))
    assert rows.size > 0
    square = 16 * scale
    assert abs(rows.min() - top) <= 2 and abs(rows.max() - (top + square - 1)) <= 2
    assert abs(columns.min() - left) <= 2 and abs(columns.max() - (left + square - 1)) <= 2
    centre = (int(top + square / 2), int(left + square / 2))
    assert not (picture[centre] == review.CONTOUR_COLOR).all()  # an outline, not a fill


def test_the_roc_curve_has_ticks_tick_labels_and_axis_titles():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    page = ReviewPage(roc_svg({"image score": (scores, labels, 0.75)}))
    texts = page.svgs["ROC curves"]
    for tick in ("0", "0.2", "0.4", "0.6", "0.8", "1"):
        assert texts.count(tick) == 2, tick  # one on each axis
    assert "false positive rate" in texts and "true positive rate" in texts
    assert "image score: AUROC 0.75" in texts
    ticks = [
        attrs for tag, attrs in page.elements if tag == "text" and attrs.get("class") == "tick"
    ]
    assert len(ticks) == 12 and not page.misnested


@pytest.mark.parametrize("rule", calib.RULES)
def test_the_decision_margin_is_positive_exactly_when_the_rule_decides_anomalous(rule):
    calibration = _calibration(rule)
    rng = np.random.default_rng(1)
    image_scores, map_scores = rng.uniform(0, 0.6, 200), rng.normal(1.2, 0.3, 200)
    decisions, _ = calib.decide(calibration, image_scores, map_scores)
    for image, pixel, decided in zip(image_scores, map_scores, decisions, strict=True):
        row = _row("x.png", image, pixel, calibration)
        image_margin, map_margin, decisive = margins(row, calibration, rule, "max")
        assert image_margin == float(row["image_score"]) - calibration["thresholds"]["image"]
        assert map_margin == float(row["map_score"]) - calibration["thresholds"]["max"]
        assert (decisive > 0) == bool(decided)


def _page(tmp_path, rule: str = "either") -> tuple[ReviewPage, str, list[dict[str, Any]]]:
    """A page of hand-made rows: one unreadable, one unlabelled, names that need escaping."""
    calibration = _calibration(rule)
    threshold = calibration["thresholds"]
    scores = [
        ("good/a.png", threshold["image"] - 0.05, threshold["max"] - 0.1),
        ('=HYPERLINK("x") <b>&amp; +1.png', threshold["image"] + 0.2, threshold["max"] - 0.2),
        ("@cmd|' -x'.png", threshold["image"] - 0.2, threshold["max"] + 0.5),
        ("-b.png", threshold["image"] + 0.01, threshold["max"] + 0.01),
        ("unlabelled.png", threshold["image"] - 0.01, threshold["max"] - 0.01),
    ]
    rows = [_row(file, image, pixel, calibration) for file, image, pixel in scores]
    rows.append({**dict.fromkeys(rows[0], ""), "file": "bad <x>.png", "error": "cannot read"})
    labels = {"good/a.png": 0, scores[1][0]: 0, scores[2][0]: 1, scores[3][0]: 1}
    at = {"tp": 2, "fp": 1, "tn": 1, "fn": 0, "precision": 2 / 3, "recall": 1.0, "f1": 0.8}
    labelled = {"report": {"at_thresholds": at | {"fpr": 0.5}}, "curves": {}, "labels": labels}
    settings = SETTINGS | {"rule": rule}
    path = write_review(tmp_path, rows, calibration, settings, {}, labelled)
    text = path.read_text()
    return ReviewPage(text), text, rows


def test_a_page_of_hand_made_rows_is_worst_first_with_margins_marks_and_escaped_names(tmp_path):
    page, text, rows = _page(tmp_path)
    assert [row["attrs"]["data-file"] for row in page.rows] == [
        "@cmd|' -x'.png",  # map margin +0.5 / std: the largest of either rule's margins
        '=HYPERLINK("x") <b>&amp; +1.png',
        "-b.png",
        "unlabelled.png",
        "good/a.png",
        "bad <x>.png",  # unreadable: no margin, last
    ]
    assert [row["attrs"]["data-mark"] for row in page.rows] == ["tp", "fp", "tp", "", "tn", ""]
    assert page.values("mark") == ["TP", "FP", "TP", "", "TN", ""]
    assert page.values("label") == ["anomalous", "normal", "anomalous", "", "normal", ""]
    header = page.headers[page.column("decision margin (σ)")]
    assert header["attrs"]["aria-sort"] == "descending" and "▼" in header["text"]
    assert sum("▼" in cell["text"] or "▲" in cell["text"] for cell in page.headers) == 1
    assert not page.misnested and len(page.scripts) == 1
    assert "<b>" not in text and "&amp;amp;" in text and 'HYPERLINK("x")' not in text
    verdicts = [row["cells"][page.column("verdict")]["text"] for row in page.rows]
    assert all("confirm" in verdict for verdict in verdicts[:-1]) and verdicts[-1] == ""
    buttons = [
        attrs["data-mark-filter"] for tag, attrs in page.elements if "data-mark-filter" in attrs
    ]
    assert buttons == ["all", "tp", "fp", "fn", "tn"]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node on PATH")
def test_the_page_script_is_valid_javascript(tmp_path):
    page, _, _ = _page(tmp_path)
    script = tmp_path / "review.js"
    script.write_text(page.scripts[0])
    result = subprocess.run(["node", "--check", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node on PATH")
def test_the_exported_verdicts_are_csv_a_spreadsheet_reads_as_text(tmp_path):
    """The page's csvField: every field quoted, quotes doubled, a leading = + - @ made text."""
    page, _, _ = _page(tmp_path)
    source = re.search(r"function csvField\(value\) \{.*?\n\}\n", page.scripts[0], re.S)
    values = ['=1+2 "q" <b> & @x.png', "@cmd", "-1", "+x", "plain, comma", "line\nbreak", "0.5"]
    program = f"{source.group(0)}process.stdout.write({json.dumps(values)}.map(csvField).join(','))"
    written = subprocess.run(["node", "-e", program], capture_output=True, text=True, check=True)
    (read,) = csv.reader(io.StringIO(written.stdout))
    assert read == [
        '\'=1+2 "q" <b> & @x.png',
        "'@cmd",
        "'-1",
        "'+x",
        "plain, comma",
        "line\nbreak",
        "0.5",
    ]
