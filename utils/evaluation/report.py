"""Result tables: per-class rows, the macro mean row, and JSON/CSV/Markdown files.

Values are fractions in [0, 1] (NaN when undefined) and are printed as 100 x value.
`undefined="nan"` (ours): the mean is over the defined classes and shows its coverage.
`undefined="zero"`: AA-CLIP's official table, undefined -> 0, each value stored as
`round(v, 4) * 100` and the mean taken over those rounded values.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from utils.core.checkpoint import atomic_write
from utils.core.errors import ConfigError

logger = logging.getLogger(__name__)

UNDEFINED_MODES = ("nan", "zero")
_COVERAGE = "{column} coverage"


def _check_mode(undefined: str) -> None:
    if undefined not in UNDEFINED_MODES:
        raise ConfigError(
            f"unknown undefined mode {undefined!r}; valid: {', '.join(UNDEFINED_MODES)}"
        )


def _official_percent(value: float) -> float:
    """AA-CLIP's stored value: undefined -> 0, then round(v, 4) * 100."""
    return round(0.0 if math.isnan(value) else value, 4) * 100


def _column(per_class: dict[str, dict[str, float]], column: str) -> list[float]:
    return [float(metrics.get(column, math.nan)) for metrics in per_class.values()]


def _column_mean(values: list[float], undefined: str) -> tuple[float, float, int]:
    """-> (mean as a fraction, mean in percent for display, number of defined values)."""
    defined = [value for value in values if not math.isnan(value)]
    if undefined == "zero":
        percent = float(np.mean([_official_percent(value) for value in values]))
        return percent / 100, percent, len(defined)
    if not defined:
        return math.nan, math.nan, 0
    mean = float(np.mean(defined))
    return mean, 100 * mean, len(defined)


def summarize(
    per_class: dict[str, dict[str, float]], columns: list[str], undefined: str = "nan"
) -> dict[str, float | str]:
    """The macro mean row: `{column: mean}` plus `{"<column> coverage": "k/K"}`.

    per_class: {class: {column: value in [0, 1] or NaN}}.
    """
    _check_mode(undefined)
    row: dict[str, float | str] = {}
    for column in columns:
        values = _column(per_class, column)
        mean, _, num_defined = _column_mean(values, undefined)
        row[column] = mean
        row[_COVERAGE.format(column=column)] = f"{num_defined}/{len(values)}"
    return row


def _format_value(value: float, undefined: str, decimals: int) -> str:
    if undefined == "zero":
        return f"{_official_percent(value):.{decimals}f}"
    return "n/a" if math.isnan(value) else f"{100 * value:.{decimals}f}"


def format_table(
    per_class: dict[str, dict[str, float]],
    columns: list[str],
    undefined: str = "nan",
    decimals: int | None = None,
) -> str:
    """Markdown table, one row per class then "mean"; decimals default 1 (2 when "zero").

    With "nan", the mean shows `(k/K)` when k < K classes are defined, and a column undefined
    for every class is dropped.
    """
    _check_mode(undefined)
    if decimals is None:
        decimals = 2 if undefined == "zero" else 1
    means = {column: _column_mean(_column(per_class, column), undefined) for column in columns}
    if undefined == "nan":
        dropped = [column for column in columns if means[column][2] == 0]
        if dropped:
            logger.info("columns undefined for every class, not printed: %s", ", ".join(dropped))
        columns = [column for column in columns if column not in dropped]
    lines = [
        "| class | " + " | ".join(columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for name, metrics in per_class.items():
        cells = [_format_value(metrics.get(c, math.nan), undefined, decimals) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    mean_cells = []
    for column in columns:
        _, percent, num_defined = means[column]
        cell = f"{percent:.{decimals}f}"
        if undefined == "nan" and num_defined < len(per_class):
            cell += f" ({num_defined}/{len(per_class)})"
        mean_cells.append(cell)
    lines.append("| mean | " + " | ".join(mean_cells) + " |")
    return "\n".join(lines) + "\n"


def _json_ready(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python numbers, containers recursively."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(
    save_dir: Path,
    stem: str,
    per_class: dict[str, dict[str, float]],
    columns: list[str],
    meta: dict[str, Any],
    undefined: str = "nan",
    decimals: int | None = None,
    images: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Path]:
    """Write `<stem>.json` (meta + raw values, and with `images` each class's per-image rows),
    `<stem>.csv` (x100) and `<stem>.md` atomically.

    -> {"json": path, "csv": path, "md": path}.
    """
    _check_mode(undefined)
    save_dir = Path(save_dir)
    row = summarize(per_class, columns, undefined)
    payload = {
        "meta": meta,
        "columns": columns,
        "undefined": undefined,
        "per_class": {
            name: {c: metrics.get(c) for c in columns} for name, metrics in per_class.items()
        },
        "mean": {column: row[column] for column in columns},
        "coverage": {column: row[_COVERAGE.format(column=column)] for column in columns},
    }
    if images is not None:
        payload["images"] = images
    text = json.dumps(_json_ready(payload), indent=2, allow_nan=False, default=str)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", *columns])
    for name, metrics in per_class.items():
        values = [metrics.get(column, math.nan) for column in columns]
        writer.writerow([name, *("" if math.isnan(v) else f"{100 * v:.4f}" for v in values)])
    means = [_column_mean(_column(per_class, column), undefined)[1] for column in columns]
    writer.writerow(["mean", *("" if math.isnan(v) else f"{v:.4f}" for v in means)])

    essentials = {key: value for key, value in meta.items() if not isinstance(value, dict | list)}
    header = " | ".join(
        f"{key}: {value}" for key, value in {**essentials, "undefined": undefined}.items()
    )
    markdown = f"{header}\n\n{format_table(per_class, columns, undefined, decimals)}"

    paths = {suffix: save_dir / f"{stem}.{suffix}" for suffix in ("json", "csv", "md")}
    for suffix, content in (("json", text + "\n"), ("csv", buffer.getvalue()), ("md", markdown)):
        atomic_write(paths[suffix], lambda file, content=content: file.write(content), mode="w")
    logger.info("results written to %s.{json,csv,md}", save_dir / stem)
    return paths
