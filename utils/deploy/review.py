"""The review page of a `predict.py score` run: `index.html`, static and self-contained.

No server and no CDN: inline CSS, a few lines of inline JavaScript (sort by a column, filter by
decision), thumbnails and overlays as files beside the page. At the top the thresholds and the
calibration's summary; then one row per file with its score, z-score, decision and the rule that
fired, unreadable files as error rows. With labels, the ROC curves and the confusion matrix of the
calibrated decisions as inline SVG.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image
from sklearn.metrics import roc_curve

from utils.core.checkpoint import atomic_write

THUMBNAIL_SIDE = 128

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 8px; }
.summary { display: flex; flex-wrap: wrap; gap: 24px; margin: 12px 0 20px; }
.summary table, .rows { border-collapse: collapse; }
.summary td, .summary th { padding: 2px 10px 2px 0; text-align: left; }
.rows th { background: #f0f0f0; cursor: pointer; user-select: none; position: sticky; top: 0; }
.rows th, .rows td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }
.rows td.num { text-align: right; font-variant-numeric: tabular-nums; }
.rows img { display: block; max-width: 128px; max-height: 128px; }
tr.anomalous td.decision { color: #b00; font-weight: 600; }
tr.normal td.decision { color: #070; }
tr.error td { color: #888; }
.controls { margin: 8px 0; }
svg text { font: 11px system-ui, sans-serif; }
"""

SCRIPT = """
const table = document.getElementById('rows');
function sortBy(column, numeric) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const ascending = table.dataset.sorted === String(column) && table.dataset.order !== 'asc';
  rows.sort((a, b) => {
    const x = a.cells[column].dataset.value ?? a.cells[column].textContent;
    const y = b.cells[column].dataset.value ?? b.cells[column].textContent;
    const value = text => (text === '' ? -Infinity : parseFloat(text));
    const order = numeric ? value(x) - value(y) : x.localeCompare(y);
    return ascending ? order : -order;
  });
  rows.forEach(row => body.appendChild(row));
  table.dataset.sorted = column;
  table.dataset.order = ascending ? 'asc' : 'desc';
}
function filterRows(decision) {
  let shown = 0;
  for (const row of table.tBodies[0].rows) {
    const visible = decision === 'all' || row.classList.contains(decision);
    row.hidden = !visible;
    shown += visible;
  }
  document.getElementById('shown').textContent = shown;
  document.getElementById('filter').value = decision;
}
// A link may carry the view: index.html#filter=anomalous&sort=2 (a column, highest first).
const view = new URLSearchParams(location.hash.slice(1));
if (view.has('sort')) sortBy(Number(view.get('sort')), true);
if (view.has('filter')) filterRows(view.get('filter'));
"""


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


def roc_svg(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], side: int = 260) -> str:
    """Inline SVG of ROC curves {name: (scores [N], labels [N] in {0, 1}, AUROC)}."""
    pad = 34
    plot = side - 2 * pad
    colors = ("#1f77b4", "#d62728")
    parts = [
        f'<svg width="{side}" height="{side + 14 + 14 * len(curves)}" role="img" '
        'aria-label="ROC curves">',
        f'<rect x="{pad}" y="{pad}" width="{plot}" height="{plot}" fill="none" stroke="#999"/>',
        f'<line x1="{pad}" y1="{pad + plot}" x2="{pad + plot}" y2="{pad}" stroke="#ccc" '
        'stroke-dasharray="4 3"/>',
        f'<text x="{pad + plot / 2}" y="{side - 6}" text-anchor="middle">'
        "false positive rate</text>",
        f'<text x="10" y="{pad + plot / 2}" text-anchor="middle" '
        f'transform="rotate(-90 10 {pad + plot / 2})">true positive rate</text>',
    ]
    for index, (name, (scores, labels, area)) in enumerate(curves.items()):
        if len(set(labels.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        points = " ".join(
            f"{pad + x * plot:.1f},{pad + (1 - y) * plot:.1f}"
            for x, y in zip(fpr, tpr, strict=True)
        )
        color = colors[index % len(colors)]
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(
            f'<text x="{pad}" y="{side + 12 + 14 * index}" fill="{color}">'
            f"{_escape(name)}: AUROC {_number(area, 4)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def confusion_svg(counts: dict[str, int], side: int = 220) -> str:
    """Inline SVG of the confusion matrix {tp, fp, tn, fn} of the calibrated decisions."""
    cell, left, top = 70, 80, 40
    cells = (("tn", 0, 0), ("fp", 1, 0), ("fn", 0, 1), ("tp", 1, 1))
    total = max(1, sum(counts[key] for key, _, _ in cells))
    parts = [
        f'<svg width="{left + 2 * cell + 10}" height="{top + 2 * cell + 30}" role="img" '
        'aria-label="confusion matrix">',
        f'<text x="{left + cell}" y="14" text-anchor="middle">decision</text>',
        f'<text x="{left + cell / 2}" y="{top - 6}" text-anchor="middle">normal</text>',
        f'<text x="{left + 1.5 * cell}" y="{top - 6}" text-anchor="middle">anomalous</text>',
        f'<text x="{left - 8}" y="{top + cell / 2}" text-anchor="end">label normal</text>',
        f'<text x="{left - 8}" y="{top + 1.5 * cell}" text-anchor="end">anomalous</text>',
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


def _summary(calibration: dict[str, Any], settings: dict[str, Any]) -> str:
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
    return (
        '<div class="summary">'
        f"<table>{about}</table>"
        f"<table><tr><th>threshold</th><th></th></tr>{thresholds}</table>"
        f"<table><tr><th>normal scores</th><th>mean</th><th>std</th></tr>{stats}</table>"
        "</div>"
    )


def write_review(
    out_dir: Path,
    rows: list[dict[str, Any]],
    calibration: dict[str, Any],
    settings: dict[str, Any],
    images: dict[str, str],
    labelled: dict[str, Any] | None = None,
) -> Path:
    """Write `<out_dir>/index.html` and return its path.

    rows: scores.csv's rows; settings: backend, rule, reduction, class_name, domain,
    preprocessing (a description);
    images: per file, its thumbnail path relative to the page (files without one show none);
    labelled: with labels, {"report": label_report, "curves": roc_svg's argument}.
    """
    out_dir = Path(out_dir)
    counts = {
        decision: sum(1 for row in rows if row["decision"] == decision)
        for decision in ("anomalous", "normal")
    }
    counts["error"] = sum(1 for row in rows if row["error"])
    body_rows = []
    for row in rows:
        kind = "error" if row["error"] else row["decision"]
        file = row["file"]
        picture = ""
        if file in images:
            overlay = f"overlays/{file}.png"
            link = quote(overlay if (out_dir / overlay).is_file() else images[file])
            picture = (
                f'<a href="{link}"><img src="{quote(images[file])}" alt="" loading="lazy"></a>'
            )
        numbers = "".join(
            f'<td class="num" data-value="{_escape(row[key])}">{_number(row[key])}</td>'
            for key in ("image_score", "image_z", "map_score", "map_z")
        )
        body_rows.append(
            f'<tr class="{kind}"><td>{picture}</td><td>{_escape(file)}</td>{numbers}'
            f'<td class="decision">{_escape(row["decision"] or "error")}</td>'
            f"<td>{_escape(row['fired'])}</td><td>{_escape(row['error'])}</td></tr>"
        )
    headers = [
        ("", False),
        ("file", False),
        ("image score", True),
        ("image z", True),
        ("map score", True),
        ("map z", True),
        ("decision", False),
        ("fired", False),
        ("error", False),
    ]
    head = "".join(
        f'<th onclick="sortBy({index}, {str(numeric).lower()})">{_escape(name)}</th>'
        for index, (name, numeric) in enumerate(headers)
    )
    labels_block = ""
    if labelled is not None:
        at = labelled["report"]["at_thresholds"]
        labels_block = (
            "<h2>With labels</h2>"
            f'<div class="summary">{roc_svg(labelled["curves"])}{confusion_svg(at)}'
            f"<table><tr><th>precision</th><td>{_number(at['precision'], 4)}</td></tr>"
            f"<tr><th>recall</th><td>{_number(at['recall'], 4)}</td></tr>"
            f"<tr><th>F1</th><td>{_number(at['f1'], 4)}</td></tr>"
            f"<tr><th>FPR</th><td>{_number(at['fpr'], 4)}</td></tr></table></div>"
        )
    options = "".join(
        f'<option value="{value}">{value} ({counts[value] if value != "all" else len(rows)})'
        "</option>"
        for value in ("all", "anomalous", "normal", "error")
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Anomaly review: {_escape(out_dir.name)}</title>
<style>{STYLE}</style></head><body>
<h1>Anomaly review: {len(rows)} files, {counts["anomalous"]} anomalous, {counts["normal"]} normal,
{counts["error"]} unreadable</h1>
{_summary(calibration, settings)}
{labels_block}
<div class="controls">show <select id="filter" onchange="filterRows(this.value)">{options}</select>
<span id="shown">{len(rows)}</span> rows; click a column to sort</div>
<table class="rows" id="rows"><thead><tr>{head}</tr></thead>
<tbody>
{"".join(body_rows)}
</tbody></table>
<script>{SCRIPT}</script>
</body></html>
"""
    path = out_dir / "index.html"
    atomic_write(path, lambda file: file.write(page), mode="w")
    return path
