"""`predict.py calibrate`: thresholds from a folder of normal images.

The folder is scored through the one prediction stream by the source's predictor (a checkpoint,
or an export on its own graph and precision) at the tiling asked for, and
`<save path>/calibration.json` (or `<stem>.calibration.json` beside a checkpoint file, or
`--output`) records the thresholds, normal-score statistics, the model, its exact
preprocessing, the class, domain, tiling and overrides, and the data it saw
(utils/deploy/calibration.py). score and export reuse them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from datasets.folder import ImageFolder, list_images
from datasets.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, ReadConfig
from datasets.tiling import TileConfig
from utils.core.checkpoint import check_writable
from utils.core.config import RUN, setting
from utils.core.errors import DataError
from utils.core.runtime import resolve_device
from utils.deploy import calibration as calib
from utils.deploy.field import FieldConfig, ThresholdConfig, score_images
from utils.inference.predictor import Predictor
from utils.inference.resolution import at_resolution
from utils.inference.source import field_class, open_predictor

logger = logging.getLogger("predict")


@dataclasses.dataclass
class CalibrateConfig(TileConfig, ReadConfig, FieldConfig, ThresholdConfig):
    """`predict.py calibrate`: thresholds from a folder of normal images."""

    normal_dir: Path = setting(None, "folder of normal images", kind=RUN, required=True)
    output: Path | None = setting(
        None, "calibration file (default: beside the checkpoint)", kind=RUN
    )


def calibrate_on(
    predictor: Predictor,
    folder: Path,
    class_name: str,
    thresholds: ThresholdConfig,
    batch_size: int = 8,
    num_workers: int | None = None,
    show_progress: bool = True,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Score a folder of normal images with `predictor` -> the calibration's thresholds,
    statistics and the data it saw (the caller adds what produced the scores). `max_pixels`:
    the pixel budget of one image (`--max_image_pixels`)."""
    rule, reduction = thresholds.decision()
    calib.check_settings(thresholds.percentile, reduction, rule)
    dataset = ImageFolder(
        folder, predictor.preprocessing, native=predictor.native, max_pixels=max_pixels
    )
    image_scores: list[float] = []
    reductions: dict[str, list[float]] = {key: [] for key in ("max", "topk_mean", "mean")}
    used: list[str] = []
    skipped: list[dict[str, str]] = []
    for item, result in score_images(
        predictor,
        dataset,
        class_name,
        batch_size,
        num_workers,
        thresholds.top_fraction,
        show_progress,
    ):
        if result is None:
            logger.warning("skipped: %s", item.error)
            skipped.append({"file": item.file, "error": item.error})
            continue
        used.append(item.file)
        image_scores.append(result["image_score"])
        for key in reductions:
            reductions[key].append(result[key])
    if not used:
        raise DataError(f"no image under {folder} could be read; see the log")
    broken = sum(
        1
        for index in range(len(used))
        if not all(np.isfinite(values[index]) for values in (image_scores, *reductions.values()))
    )
    if broken:
        raise DataError(
            f"the model gives non-finite scores for {broken} of {len(used)} normal images: its "
            "checkpoint is broken (a diverged training?); retrain it before calibrating"
        )
    calibration = calib.calibrate(
        np.asarray(image_scores),
        {key: np.asarray(values) for key, values in reductions.items()},
        thresholds.percentile,
        reduction,
        thresholds.top_fraction,
        rule,
    )
    calibration.update(
        {
            "created": calib.now(),
            "preprocessing": predictor.preprocessing.to_dict(),
            "tiling": predictor.tiling,
            "class_name": class_name,
            "domain": predictor.domain,
            "amp": predictor.amp,
            "data": {
                "folder": str(Path(folder).resolve()),
                "count": len(used),
                "files_sha256": calib.files_digest(used),
                "skipped": skipped,
            },
        }
    )
    return calibration


def report_calibration(calibration: dict[str, Any], path: Path) -> None:
    """One line: how many normal images, the thresholds, the file."""
    thresholds = calibration["thresholds"]
    print(
        f"calibrated on {calibration['data']['count']} normal images "
        f"(p{calibration['percentile']:g}): T_img={thresholds['image']:.6g} "
        f"T_max={thresholds['max']:.6g} T_topk_mean={thresholds['topk_mean']:.6g} -> {path}"
    )


def calibrate(config: CalibrateConfig, overrides: dict[str, Any]) -> Path:
    """Score the normal folder with the checkpoint (or an export, on its own graph), write the
    calibration JSON; returns its path. `overrides`: the model settings given (`--preprocess
    letterbox`, ...), recorded and reused by score/export."""
    rule, reduction = config.decision()
    calib.check_settings(config.percentile, reduction, rule)
    given_class = config.one_class()
    list_images(config.normal_dir)  # an empty folder fails before model loading
    path = config.output or calib.calibration_path(config.checkpoint)
    check_writable(Path(path).parent, "--output")
    opened = open_predictor(
        config,
        overrides,
        device=resolve_device(config.device),
        domain=config.domain,
        amp=config.amp,
        tiling=config.tiling(),
        trust=config.trust_checkpoint,
    )
    class_name = field_class(given_class, opened)
    opened.predictor.check_classes([class_name])
    calibration = calibrate_on(
        at_resolution(opened.predictor, config, config.batch_size),
        config.normal_dir,
        class_name,
        config,
        config.batch_size,
        config.num_workers,
        config.progress,
        config.max_image_pixels,
    )
    calibration.update({"model": opened.provenance, "graph": opened.graph, "overrides": overrides})
    calib.save_calibration(path, calibration)
    report_calibration(calibration, path)
    return path
