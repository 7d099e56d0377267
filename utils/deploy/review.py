"""The review page of a `predict.py score` run: `index.html`, static and self-contained.

No server and no CDN: inline CSS, JavaScript and SVG; pictures are files beside the page. A
compact band at the top (the calibration's summary, thresholds, normal statistics, the heat
colour scale; with labels precision/recall and the ROC curves and confusion matrix, collapsed)
keeps the first rows above the fold. Then one row per file, worst first (largest decision margin
first): the thumbnail beside its heat overlay (drawn at thumbnail size, with the contour where
the map crosses the pixel threshold T_max), the scores, their signed margins to the thresholds,
z-scores, decision, the rule that fired, with labels the label and TP/FP/FN/TN, and the
inspector's verdict (kept in the browser's localStorage per run and file, exported as CSV).
Unreadable files are error rows. Click a column to sort, filter by decision or mark; the URL hash
carries the view (`index.html#filter=anomalous&mark=fp&sort=2&order=asc`), and anything malformed
in it falls back to the default view.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from itertools import chain, count
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_curve

from datasets.preprocessing import Geometry
from utils.core.checkpoint import atomic_write
from utils.core.names import short_stem
from utils.deploy import calibration as calib
from utils.evaluation.visualize import TURBO_LUT, overlay

THUMBNAIL_SIDE = 128
STEM_RESERVE = 40  # bytes a picture name adds to its stem: `_tiff_<n>_overlay.png`
CONTOUR_COLOR = (255, 0, 255)  # magenta: not a turbo colour, so it stands out on any heat
MARKS = ("tp", "fp", "fn", "tn")

STYLE = """
body { font: 13px/1.35 system-ui, sans-serif; margin: 12px 16px; color: #222; }
h1 { font-size: 17px; margin: 0 0 6px; }
.band { display: flex; flex-wrap: wrap; gap: 6px 20px; align-items: flex-start;
  font-size: 12px; line-height: 1.25; margin: 0 0 4px; }
.band table { border-collapse: collapse; }
.band td, .band th { padding: 0 8px 1px 0; text-align: left; vertical-align: top; }
.band td { max-width: 300px; overflow-wrap: anywhere; }
.band th { font-weight: 600; color: #444; }
.band figure { margin: 0; }
.band figcaption { max-width: 220px; color: #555; }
details.charts summary { cursor: pointer; color: #06c; }
details.charts[open] { flex-basis: 100%; }
.charts-body { display: flex; flex-wrap: wrap; gap: 24px; margin-top: 6px; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 18px; margin: 6px 0; }
.marks button[aria-pressed="true"] { background: #333; color: #fff; }
.rows { border-collapse: collapse; }
.rows th { background: #f0f0f0; position: sticky; top: 0; z-index: 1; padding: 0;
  text-align: left; vertical-align: bottom; }
.rows th button, .rows th span.plain { display: block; font: inherit; font-weight: 600;
  border: 0; background: none; padding: 5px 6px; text-align: left; }
.rows th button { cursor: pointer; }
.arrow { display: inline-block; min-width: 1em; }
.rows td { border-bottom: 1px solid #ddd; padding: 3px 6px; text-align: left; }
.rows td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.rows td.above { color: #b00; }
.rows td.file { max-width: 200px; overflow-wrap: anywhere; }
.rows td.error { max-width: 220px; overflow-wrap: anywhere; }
.rows td.pictures { white-space: nowrap; }
.rows td.pictures a { display: inline-block; vertical-align: top; margin-right: 4px; }
.rows img { display: block; max-width: 128px; max-height: 128px; }
tr.anomalous td.decision { color: #b00; font-weight: 600; }
tr.normal td.decision { color: #070; }
tr.error td { color: #888; }
td.mark-fp, td.mark-fn { color: #b00; font-weight: 600; }
tr[data-verdict="confirm"] select { background: #e6f4e6; }
tr[data-verdict="override"] select { background: #fde8e8; }
svg text { font: 11px system-ui, sans-serif; }
"""

SCRIPT = r"""
'use strict';
const table = document.getElementById('rows');
const body = table.tBodies[0];
const headers = Array.from(table.tHead.rows[0].cells);
const defaultSort = Number(table.dataset.defaultSort);
const run = table.dataset.run;
const decisions = Array.from(document.getElementById('filter').options, option => option.value);
const marks = ['all', ...Array.from(document.querySelectorAll('[data-mark-filter]'),
  button => button.dataset.markFilter)];
const state = {sort: defaultSort, order: 'desc', filter: 'all', mark: 'all'};

function cellValue(row, column) {
  const cell = row.cells[column];
  return cell.dataset.value ?? cell.textContent;
}
function number(text) {
  const value = parseFloat(text);
  return Number.isFinite(value) ? value : -Infinity;
}
function sortBy(column, order) {
  const numeric = headers[column].dataset.sort === 'number';
  const sign = order === 'asc' ? 1 : -1;
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    let result;
    if (numeric) {
      const x = number(cellValue(a, column));
      const y = number(cellValue(b, column));
      result = x === y ? 0 : (x < y ? -1 : 1);
    } else {
      result = cellValue(a, column).localeCompare(cellValue(b, column));
    }
    return sign * result || Number(a.dataset.index) - Number(b.dataset.index);
  });
  const fragment = document.createDocumentFragment();
  rows.forEach(row => fragment.appendChild(row));
  body.appendChild(fragment);
  headers.forEach((header, index) => {
    if (header.dataset.sort === undefined) return;
    const sorted = index === column;
    const direction = order === 'asc' ? 'ascending' : 'descending';
    header.setAttribute('aria-sort', sorted ? direction : 'none');
    header.querySelector('.arrow').textContent = sorted ? (order === 'asc' ? '▲' : '▼') : '';
  });
  state.sort = column;
  state.order = order;
}
function applyFilter() {
  let shown = 0;
  for (const row of body.rows) {
    const visible = (state.filter === 'all' || row.dataset.kind === state.filter)
      && (state.mark === 'all' || row.dataset.mark === state.mark);
    row.hidden = !visible;
    shown += visible;
  }
  document.getElementById('shown').textContent = shown;
  document.getElementById('filter').value = state.filter;
  for (const button of document.querySelectorAll('[data-mark-filter]')) {
    button.setAttribute('aria-pressed', String(button.dataset.markFilter === state.mark));
  }
}
// The hash is user input: anything unknown or malformed falls back to the default view.
function readView() {
  let view;
  try {
    view = new URLSearchParams(location.hash.slice(1));
  } catch (error) {
    view = new URLSearchParams();
  }
  const pick = (name, allowed) => {
    const value = (view.get(name) ?? '').trim().toLowerCase();
    return allowed.includes(value) ? value : allowed[0];
  };
  const text = (view.get('sort') ?? '').trim();
  const column = /^[0-9]{1,3}$/.test(text) ? Number(text) : -1;
  const sortable = column >= 0 && column < headers.length
    && headers[column].dataset.sort !== undefined;
  const sort = sortable ? column : defaultSort;
  const numeric = headers[sort].dataset.sort === 'number';  // highest first; text A to Z
  return {
    sort,
    order: pick('order', numeric ? ['desc', 'asc'] : ['asc', 'desc']),
    filter: pick('filter', decisions),
    mark: pick('mark', marks),
  };
}
function applyView() {
  const view = readView();
  sortBy(view.sort, view.order);
  state.filter = view.filter;
  state.mark = view.mark;
  applyFilter();
}
function writeView() {
  const view = new URLSearchParams();
  if (state.filter !== 'all') view.set('filter', state.filter);
  if (state.mark !== 'all') view.set('mark', state.mark);
  if (state.sort !== defaultSort || state.order !== 'desc') {
    view.set('sort', state.sort);
    view.set('order', state.order);
  }
  try {
    history.replaceState(null, '', '#' + view.toString());
  } catch (error) {
    // a browser may refuse history edits on a file: page; the view still applies
  }
}

// Verdicts: one localStorage entry per run and file, the key a JSON array (no separator to fake).
let storage = null;
try {
  storage = window.localStorage;
  storage.getItem('anomaly-review');
} catch (error) {
  storage = null;
}
const storageKey = file => JSON.stringify(['anomaly-review', run, file]);
function loadVerdict(file) {
  if (storage === null) return null;
  try {
    const saved = JSON.parse(storage.getItem(storageKey(file)));
    return saved && ['confirm', 'override'].includes(saved.verdict) ? saved : null;
  } catch (error) {
    return null;
  }
}
function countVerdicts() {
  const recorded = Array.from(body.rows).filter(row => loadVerdict(row.dataset.file)).length;
  document.getElementById('verdicts').textContent = recorded;
}
function recordVerdict(row, verdict) {
  row.dataset.verdict = verdict;
  if (storage === null) return;
  const key = storageKey(row.dataset.file);
  try {
    if (verdict) storage.setItem(key, JSON.stringify({verdict, at: new Date().toISOString()}));
    else storage.removeItem(key);
  } catch (error) {
    document.getElementById('storage').textContent = 'not saved: ' + error.message;
  }
  countVerdicts();
}
function csvField(value) {
  let text = String(value ?? '');
  if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;  // a spreadsheet would run it as a formula
  return '"' + text.replace(/"/g, '""') + '"';
}
function exportVerdicts() {
  const lines = [['run', 'file', 'decision', 'verdict', 'final_decision', 'label', 'recorded_at']];
  for (const row of body.rows) {
    const saved = loadVerdict(row.dataset.file);
    if (!saved) continue;
    const decision = row.dataset.kind;
    const flipped = decision === 'anomalous' ? 'normal' : 'anomalous';
    const final = saved.verdict === 'confirm' ? decision : flipped;
    lines.push([run, row.dataset.file, decision, saved.verdict, final, row.dataset.label ?? '',
      saved.at]);
  }
  const text = lines.map(line => line.map(csvField).join(',')).join('\r\n') + '\r\n';
  const url = URL.createObjectURL(new Blob([text], {type: 'text/csv;charset=utf-8'}));
  const link = document.createElement('a');
  link.href = url;
  link.download = 'verdicts-' + run + '.csv';
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

for (const header of headers) {
  const button = header.querySelector('button');
  if (!button) continue;
  button.addEventListener('click', () => {
    const column = Number(header.dataset.column);
    const first = header.dataset.sort === 'number' ? 'desc' : 'asc';
    const flipped = state.order === 'desc' ? 'asc' : 'desc';
    sortBy(column, state.sort === column ? flipped : first);
    writeView();
  });
}
document.getElementById('filter').addEventListener('change', event => {
  state.filter = decisions.includes(event.target.value) ? event.target.value : 'all';
  applyFilter();
  writeView();
});
for (const button of document.querySelectorAll('[data-mark-filter]')) {
  button.addEventListener('click', () => {
    state.mark = button.dataset.markFilter;
    applyFilter();
    writeView();
  });
}
for (const row of body.rows) {
  const select = row.querySelector('select.verdict');
  if (!select) continue;
  const saved = loadVerdict(row.dataset.file);
  select.value = saved ? saved.verdict : '';
  row.dataset.verdict = select.value;
  select.addEventListener('change', () => recordVerdict(row, select.value));
}
document.getElementById('export').addEventListener('click', exportVerdicts);
if (storage === null) {
  document.getElementById('storage').textContent = 'this browser keeps no verdicts here';
}
countVerdicts();
window.addEventListener('hashchange', applyView);
applyView();
"""


class Pictures(NamedTuple):
    """A scored file's pictures, relative to the page."""

    thumbnail: str  # the image, at most THUMBNAIL_SIDE px
    heat: str  # the heat overlay at thumbnail size, with the threshold contour
    overlay: str  # the full-resolution overlay (written unless --no_overlays)


def picture_names(files: list[str]) -> dict[str, Pictures]:
    """Per file (relative POSIX name, in scoring order), where its pictures go: named by the
    stem (`good/a.png` -> `thumbnails/good/a.png`, `thumbnails/good/a_overlay.png`,
    `overlays/good/a_overlay.png`). A stem that an earlier file of the folder took (`a.jpg`,
    then `a.png` or `A.png`: case-insensitive disks would merge those) or that names a folder
    gets the extension (`a_png`), then a number. A stem too long for the names derived from it
    (255 bytes) keeps its start and a hash of the whole (`short_stem`)."""
    used = {str(parent).lower() for file in files for parent in PurePosixPath(file).parents}
    names: dict[str, Pictures] = {}
    for file in files:
        path = PurePosixPath(file)
        extension = path.suffix.lstrip(".")
        short = short_stem(path.stem, STEM_RESERVE)
        numbered = (f"{short}_{extension}_{index}" for index in count(2))
        for stem in chain((short, f"{short}_{extension}"), numbered):
            base = str(path.with_name(stem))
            taken = {f"{base}.png".lower(), f"{base}_overlay.png".lower()}
            if not taken & used:
                break
        used |= taken
        names[file] = Pictures(
            f"thumbnails/{base}.png",
            f"thumbnails/{base}_overlay.png",
            f"overlays/{base}_overlay.png",
        )
    return names


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 6) -> str:
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return ""


def save_thumbnail(path: Path, image: np.ndarray) -> None:
    """`image` `[H, W, 3]` uint8 at most THUMBNAIL_SIDE px on its long side, written atomically."""
    picture = Image.fromarray(image)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    atomic_write(Path(path), lambda file: picture.convert("RGB").save(file, format="PNG"))


def save_heat_thumbnail(
    path: Path,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    geometry: Geometry,
    calibration: dict[str, Any],
) -> None:
    """The heat overlay over the region the model saw, drawn at thumbnail size (never at the
    image's), with the pixels where the map crosses T_max (the pixel threshold) outlined.

    image: `[H, W, 3]` uint8; anomaly_map: `[S, S]`, placed on the image by `geometry`.
    """
    picture = Image.fromarray(image)
    if geometry.crop != (0, 0, *picture.size):
        picture = picture.crop(geometry.crop)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    content = np.asarray(anomaly_map, dtype=np.float32)[
        geometry.top : geometry.top + geometry.content_height,
        geometry.left : geometry.left + geometry.content_width,
    ]
    small = np.asarray(Image.fromarray(content).resize(picture.size, Image.Resampling.BILINEAR))
    drawn = overlay(np.asarray(picture.convert("RGB")), calib.heat(small, calibration))
    above = small > calibration["thresholds"]["max"]
    # border_value=1: the picture's edge is not a crossing; only where the map falls below is.
    inside = ndimage.binary_erosion(above, structure=np.ones((3, 3), bool), border_value=1)
    drawn[above & ~inside] = CONTOUR_COLOR
    atomic_write(Path(path), lambda file: Image.fromarray(drawn).save(file, format="PNG"))


def _axis_ticks(left: float, top: float, plot: float) -> list[str]:
    """Ticks, tick labels and grid lines at 0, 0.2, ..., 1 on both axes of a square plot."""
    parts = []
    for tick in np.linspace(0.0, 1.0, 6):
        x, y, label = left + tick * plot, top + (1 - tick) * plot, f"{tick:g}"
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot}" stroke="#eee"/>'
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot}" y2="{y:.1f}" stroke="#eee"/>'
            f'<line x1="{x:.1f}" y1="{top + plot}" x2="{x:.1f}" y2="{top + plot + 4}" '
            'stroke="#666"/>'
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#666"/>'
            f'<text class="tick" x="{x:.1f}" y="{top + plot + 16}" text-anchor="middle">'
            f"{label}</text>"
            f'<text class="tick" x="{left - 7}" y="{y + 4:.1f}" text-anchor="end">{label}</text>'
        )
    return parts


def roc_svg(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], plot: int = 200) -> str:
    """Inline SVG of ROC curves {name: (scores [N], labels [N] in {0, 1}, AUROC)}, with ticks
    and tick labels at 0, 0.2, ..., 1 and axis titles."""
    left, top, bottom = 50, 10, 40
    # wide enough for the legend ("image score: AUROC 0.1234") under the plot
    width, height = left + plot + 60, top + plot + bottom + 15 * len(curves)
    colors = ("#1f77b4", "#d62728")
    parts = [
        f'<svg width="{width}" height="{height}" font-size="11" role="img" '
        'aria-label="ROC curves">',
        *_axis_ticks(left, top, plot),
        f'<rect x="{left}" y="{top}" width="{plot}" height="{plot}" fill="none" stroke="#999"/>',
        f'<line x1="{left}" y1="{top + plot}" x2="{left + plot}" y2="{top}" stroke="#ccc" '
        'stroke-dasharray="4 3"/>',
        f'<text class="axis" x="{left + plot / 2}" y="{top + plot + 32}" text-anchor="middle">'
        "false positive rate</text>",
        f'<text class="axis" x="12" y="{top + plot / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot / 2})">true positive rate</text>',
    ]
    for index, (name, (scores, labels, area)) in enumerate(curves.items()):
        if len(set(labels.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        points = " ".join(
            f"{left + x * plot:.1f},{top + (1 - y) * plot:.1f}"
            for x, y in zip(fpr, tpr, strict=True)
        )
        color = colors[index % len(colors)]
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(
            f'<text x="{left}" y="{top + plot + bottom + 12 + 15 * index}" fill="{color}">'
            f"{_escape(name)}: AUROC {_number(area, 4)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def confusion_svg(counts: dict[str, int]) -> str:
    """Inline SVG of the confusion matrix {tp, fp, tn, fn} of the calibrated decisions."""
    cell, left, top = 70, 120, 40  # room for the row labels left of the cells
    cells = (("tn", 0, 0), ("fp", 1, 0), ("fn", 0, 1), ("tp", 1, 1))
    total = max(1, sum(counts[key] for key, _, _ in cells))
    parts = [
        f'<svg width="{left + 2 * cell + 10}" height="{top + 2 * cell + 30}" font-size="11" '
        'role="img" aria-label="confusion matrix">',
        f'<text x="{left + cell}" y="14" text-anchor="middle">decision</text>',
        f'<text x="{left + cell / 2}" y="{top - 6}" text-anchor="middle">normal</text>',
        f'<text x="{left + 1.5 * cell}" y="{top - 6}" text-anchor="middle">anomalous</text>',
        f'<text x="{left - 8}" y="{top + cell / 2}" text-anchor="end">label normal</text>',
        f'<text x="{left - 8}" y="{top + 1.5 * cell}" text-anchor="end">label anomalous</text>',
    ]
    for key, column, row in cells:
        shade = int(255 - 150 * counts[key] / total)
        x, y = left + column * cell, top + row * cell
        parts.append(
            f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" '
            f'fill="rgb({shade},{shade},255)" stroke="#fff"/>'
            f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle">'
            f"{key.upper()} {counts[key]}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def colour_bar_svg(calibration: dict[str, Any], width: int = 200) -> str:
    """Inline SVG of the heat colour scale: map values at heat 0, 0.5 (T_max, the contour) and 1
    (calib.heat's fixed scale), the contour's colour at T_max."""
    low = calibration["stats"]["mean"]["median"]
    threshold = calibration["thresholds"]["max"]
    high = low + 2 * (threshold - low)
    stops = "".join(
        f'<stop offset="{fraction:g}" stop-color="rgb{tuple(int(c) for c in TURBO_LUT[index])}"/>'
        for fraction, index in ((step / 10, round(step * 25.5)) for step in range(11))
    )
    left, bar = 10, width - 20
    ticks = "".join(
        f'<line x1="{left + at * bar}" y1="4" x2="{left + at * bar}" y2="20" stroke="{color}" '
        f'stroke-width="{2 if at == 0.5 else 1}"/>'
        f'<text x="{left + at * bar}" y="32" text-anchor="{anchor}">{_number(value, 4)}</text>'
        for at, value, color, anchor in (  # the end labels stay inside the bar's width
            (0.0, low, "#333", "start"),
            (0.5, threshold, f"rgb{CONTOUR_COLOR}", "middle"),
            (1.0, high, "#333", "end"),
        )
    )
    return (
        f'<svg width="{width}" height="36" font-size="11" role="img" '
        'aria-label="heat colour scale">'
        f'<defs><linearGradient id="turbo-scale">{stops}</linearGradient></defs>'
        f'<rect x="{left}" y="6" width="{bar}" height="12" fill="url(#turbo-scale)"/>'
        f"{ticks}</svg>"
    )


def _summary(calibration: dict[str, Any], settings: dict[str, Any]) -> str:
    """The calibration's summary, thresholds, normal statistics and the heat colour scale."""
    thresholds = "".join(
        f"<tr><th>T_{_escape(name)}</th><td>{_number(value)}</td></tr>"
        for name, value in calibration["thresholds"].items()
    )
    stats = "".join(
        f"<tr><th>{_escape(name)}</th><td>{_number(values.get('mean'))}</td>"
        f"<td>{_number(values.get('std'))}</td></tr>"
        for name, values in calibration["stats"].items()
    )
    data = calibration.get("data", {})
    rows = {
        "model": f"{calibration['model']['name']} ({settings['backend']})",
        "rule": f"{settings['rule']} on the {settings['reduction']} map score",
        "percentile": f"p{calibration['percentile']:g} of {data.get('count', '?')} normal images",
        "normal folder": data.get("folder", "?"),
        "calibrated": calibration.get("created", "?"),
        "class, domain": f"{settings['class_name']}, {settings['domain']}",
        "preprocessing": settings["preprocessing"],
    }
    about = "".join(f"<tr><th>{_escape(k)}</th><td>{_escape(v)}</td></tr>" for k, v in rows.items())
    contour = (
        f"heat over the image; the magenta contour outlines the pixels above T_max = "
        f"{_number(calibration['thresholds']['max'])} (the pixel threshold: "
        f"p{calibration['percentile']:g} of the normal images' highest pixel)"
    )
    return (
        f'<table class="about">{about}</table>'
        f"<table><tr><th>threshold</th><th></th></tr>{thresholds}</table>"
        f"<table><tr><th>normal scores</th><th>mean</th><th>std</th></tr>{stats}</table>"
        f'<figure class="legend">{colour_bar_svg(calibration)}'
        f"<figcaption>{_escape(contour)}</figcaption></figure>"
    )


def _std(stats: dict[str, Any]) -> float:
    return stats["std"] if stats["std"] > 0 else 1.0  # as calib.z_score


def margins(
    row: dict[str, Any], calibration: dict[str, Any], rule: str, reduction: str
) -> tuple[float, float, float] | None:
    """(image score - T_image, map score - T_reduction, decision margin) of a scored row; None
    for an error row. The decision margin is in normal standard deviations, of the score the rule
    decides on (the larger of the two for `either`, the smaller for `both`): > 0 is anomalous."""
    if row["error"]:
        return None
    thresholds, stats = calibration["thresholds"], calibration["stats"]
    image = float(row["image_score"]) - thresholds["image"]
    pixel = float(row["map_score"]) - thresholds[reduction]
    scaled = (image / _std(stats["image"]), pixel / _std(stats[reduction]))
    decisive = {"image": scaled[0], "pixel": scaled[1], "either": max(scaled), "both": min(scaled)}
    return image, pixel, decisive[rule]


def _run_id(rows: list[dict[str, Any]], calibration: dict[str, Any]) -> str:
    """Names the run in the browser's storage: the same scores under the same calibration give
    the same id, wherever the page is opened from."""
    content = [calibration.get("created"), calibration["model"].get("checkpoint_sha256")]
    content += [[row[key] for key in ("file", "image_score", "map_score", "error")] for row in rows]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]


def _picture_cell(out_dir: Path, pictures: Pictures | None) -> str:
    """The thumbnail and its heat overlay at their own size, each linking to the full overlay
    (the heat thumbnail when overlays were not written)."""
    if pictures is None:
        return '<td class="pictures"></td>'
    target = pictures.overlay if (out_dir / pictures.overlay).is_file() else pictures.heat
    links = []
    for source, alt in ((pictures.thumbnail, "image"), (pictures.heat, "heat")):
        if not (out_dir / source).is_file():
            continue
        with Image.open(out_dir / source) as picture:
            width, height = picture.size
        links.append(
            f'<a href="{quote(target)}"><img src="{quote(source)}" alt="{alt}" '
            f'width="{width}" height="{height}" loading="lazy"></a>'
        )
    return f'<td class="pictures">{"".join(links)}</td>'


def _numbers(values: list[tuple[float | None, str]]) -> str:
    """Right-aligned cells, the exact value in data-value (what sorting reads); a positive
    margin ("+...") is marked `above` its threshold."""
    cells = []
    for value, text in values:
        exact = "" if value is None or not math.isfinite(value) else repr(value)
        css = "num above" if text.startswith("+") else "num"
        cells.append(f'<td class="{css}" data-value="{exact}">{_escape(text)}</td>')
    return "".join(cells)


def _score(text: str) -> float:
    return float(text) if text else math.nan


def _header(rule: str, reduction: str, labelled: bool) -> tuple[str, int]:
    """The table's header row (sortable columns carry data-sort) and the index of the default
    sort column, the decision margin (highest first)."""
    combined = {"either": " (the larger of image and map)", "both": " (the smaller of the two)"}
    decision_title = (
        f"(score - threshold) / the normal std of the score the {rule} rule decides on"
        f"{combined.get(rule, '')}; above 0 is anomalous"
    )
    columns: list[tuple[str, str | None, str]] = [
        ("image | heat", None, "the thumbnail and its heat overlay; click for the full overlay"),
        ("file", "text", ""),
        ("image score", "number", ""),
        ("image margin", "number", "image score - T_image"),
        ("image z", "number", "z-score against the normal images"),
        (f"map score ({reduction})", "number", ""),
        ("map margin", "number", f"map score - T_{reduction}"),
        ("map z", "number", "z-score against the normal images"),
        ("decision margin (σ)", "number", decision_title),
        ("decision", "text", ""),
        ("fired", "text", "which threshold the score crossed"),
    ]
    if labelled:
        columns += [("label", "text", ""), ("mark", "text", "TP/FP/FN/TN of the decision")]
    columns += [("verdict", None, "yours, kept in this browser"), ("error", "text", "")]
    default_sort = [name for name, _, _ in columns].index("decision margin (σ)")
    cells = []
    for index, (name, sort, title) in enumerate(columns):
        title_attribute = f' title="{_escape(title)}"' if title else ""
        if sort is None:
            cells.append(f'<th{title_attribute}><span class="plain">{_escape(name)}</span></th>')
            continue
        here = index == default_sort
        cells.append(
            f'<th data-column="{index}" data-sort="{sort}"{title_attribute} '
            f'aria-sort="{"descending" if here else "none"}"><button type="button">'
            f'{_escape(name)} <span class="arrow">{"▼" if here else ""}</span></button></th>'
        )
    return f"<tr>{''.join(cells)}</tr>", default_sort


def _body_row(
    position: int,
    row: dict[str, Any],
    margin: tuple[float, float, float] | None,
    pictures: str,
    labels: dict[str, int] | None,
) -> tuple[str, str]:
    """One file's table row (pictures: its picture cell) and its mark: tp, fp, fn, tn, or ""
    without a label."""
    kind = "error" if row["error"] else row["decision"]
    file = row["file"]
    label = labels.get(file) if labels is not None and not row["error"] else None
    mark = "" if label is None else ("tn", "fp", "fn", "tp")[2 * label + (kind == "anomalous")]
    image, pixel, decisive = margin if margin is not None else (None, None, None)
    numbers = _numbers(
        [
            (_score(row["image_score"]), _number(row["image_score"])),
            (image, "" if image is None else f"{image:+.4g}"),
            (_score(row["image_z"]), _number(row["image_z"], 4)),
            (_score(row["map_score"]), _number(row["map_score"])),
            (pixel, "" if pixel is None else f"{pixel:+.4g}"),
            (_score(row["map_z"]), _number(row["map_z"], 4)),
            (decisive, "" if decisive is None else f"{decisive:+.3g}"),
        ]
    )
    label_name = "" if label is None else ("normal", "anomalous")[label]
    labelled = ""
    if labels is not None:
        labelled = f'<td>{label_name}</td><td class="mark mark-{mark}">{mark.upper()}</td>'
    verdict = ""
    if not row["error"]:
        flipped = "normal" if kind == "anomalous" else "anomalous"
        verdict = (
            f'<select class="verdict" aria-label="verdict on {_escape(file)}">'
            '<option value="">-</option>'
            f'<option value="confirm">confirm {kind}</option>'
            f'<option value="override">override → {flipped}</option></select>'
        )
    label_attribute = f' data-label="{label_name}"' if label_name else ""
    html_row = (
        f'<tr class="{kind}" data-kind="{kind}" data-mark="{mark}" data-index="{position}" '
        f'data-file="{_escape(file)}"{label_attribute}>{pictures}'
        f'<td class="file">{_escape(file)}</td>{numbers}'
        f'<td class="decision">{_escape(row["decision"] or "error")}</td>'
        f"<td>{_escape(row['fired'])}</td>{labelled}"
        f'<td class="verdict-cell">{verdict}</td>'
        f'<td class="error">{_escape(row["error"])}</td></tr>'
    )
    return html_row, mark


def _labelled_band(labelled: dict[str, Any]) -> str:
    """Precision, recall, F1 and FPR at the thresholds; the ROC curves and the confusion matrix
    folded in a <details> (they would push the table below the fold)."""
    at = labelled["report"]["at_thresholds"]
    rows = "".join(
        f"<tr><th>{name}</th><td>{_number(at[key], 4)}</td></tr>"
        for name, key in (("precision", "precision"), ("recall", "recall"), ("F1", "f1"))
    )
    return (
        f"<table>{rows}<tr><th>FPR</th><td>{_number(at['fpr'], 4)}</td></tr></table>"
        '<details class="charts"><summary>ROC curves, confusion matrix</summary>'
        f'<div class="charts-body">{roc_svg(labelled["curves"])}{confusion_svg(at)}</div>'
        "</details>"
    )


def write_review(
    out_dir: Path,
    rows: list[dict[str, Any]],
    calibration: dict[str, Any],
    settings: dict[str, Any],
    pictures: dict[str, Pictures],
    labelled: dict[str, Any] | None = None,
) -> Path:
    """Write `<out_dir>/index.html` and return its path.

    rows: scores.csv's rows; settings: backend, rule, reduction, class_name, domain,
    preprocessing (a description); pictures: per file, its pictures (picture_names; a file
    without pictures, or whose pictures are missing, shows none); labelled: with labels,
    {"report": label_report, "curves": roc_svg's argument, "labels": {file: 0 or 1}}.
    """
    out_dir = Path(out_dir)
    rule, reduction = settings["rule"], settings["reduction"]
    labels = labelled["labels"] if labelled is not None else None
    counts = {"all": len(rows), "error": sum(1 for row in rows if row["error"])}
    for decision in ("anomalous", "normal"):
        counts[decision] = sum(1 for row in rows if row["decision"] == decision)
    measured = [margins(row, calibration, rule, reduction) for row in rows]

    def worst_first(index: int) -> tuple[int, float, int]:
        margin = measured[index]
        if margin is None or not math.isfinite(margin[2]):
            return 1, 0.0, index  # no score: last, in file order
        return 0, -margin[2], index

    body_rows, marks = [], dict.fromkeys(MARKS, 0)
    for position, index in enumerate(sorted(range(len(rows)), key=worst_first)):
        row = rows[index]
        cell = _picture_cell(out_dir, pictures.get(row["file"]))
        html_row, mark = _body_row(position, row, measured[index], cell, labels)
        body_rows.append(html_row)
        if mark:
            marks[mark] += 1
    head, default_sort = _header(rule, reduction, labels is not None)
    band = _summary(calibration, settings)
    mark_buttons = ""
    if labelled is not None:
        band += _labelled_band(labelled)
        buttons = "".join(
            f'<button type="button" data-mark-filter="{mark}" aria-pressed="false">'
            f"{mark.upper()} ({marks[mark]})</button>"
            for mark in MARKS
        )
        mark_buttons = (
            '<span class="marks" role="group" aria-label="filter by mark">'
            '<button type="button" data-mark-filter="all" aria-pressed="true">all</button>'
            f"{buttons}</span>"
        )
    options = "".join(
        f'<option value="{value}">{value} ({counts[value]})</option>'
        for value in ("all", "anomalous", "normal", "error")
    )
    run = _run_id(rows, calibration)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Anomaly review: {_escape(out_dir.name)}</title>
<style>{STYLE}</style></head><body>
<h1>Anomaly review: {len(rows)} files, {counts["anomalous"]} anomalous, {counts["normal"]} normal,
{counts["error"]} unreadable</h1>
<div class="band">{band}</div>
<div class="controls"><label>show <select id="filter">{options}</select></label>{mark_buttons}
<span><span id="shown">{len(rows)}</span> of {len(rows)} rows, worst first; click a column to
sort</span>
<span><button type="button" id="export">export verdicts (CSV)</button>
<span id="verdicts">0</span> verdicts recorded for run <code>{run}</code>
<span id="storage"></span></span></div>
<table class="rows" id="rows" data-run="{run}" data-default-sort="{default_sort}">
<thead>{head}</thead>
<tbody>
{"".join(body_rows)}
</tbody></table>
<script>{SCRIPT}</script>
</body></html>
"""
    path = out_dir / "index.html"
    atomic_write(path, lambda file: file.write(page), mode="w")
    return path
