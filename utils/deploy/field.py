"""What the field engineer's commands (predict.py calibrate, score and export; one module each
beside this one) share: their settings groups, and the folder of images read through the one
prediction stream with each map reduced to the scores a decision uses.

Every model in models.registry works through one predictor (`utils.inference.source.
open_predictor`: a checkpoint, or an export's graph), which owns the model's preprocessing
(`--preprocess letterbox`, `--pad_color`, ... override it, and the override is recorded). A
folder's unreadable file (over the `--max_image_pixels` budget, deleted meanwhile, corrupt) is a
result with its error, never a stopped run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from datasets.catalog import DOMAINS
from datasets.folder import ImageFolder, preview
from datasets.items import ImageItem
from utils.core.config import RUN, redefault, setting
from utils.core.errors import ConfigError
from utils.core.runtime import RuntimeConfig
from utils.deploy import calibration as calib
from utils.inference.predictor import Predictor
from utils.inference.source import ModelSource
from utils.inference.stream import item_loader, predict_images

logger = logging.getLogger("predict")


@dataclasses.dataclass
class FieldConfig(ModelSource, RuntimeConfig):
    """What every predict.py command reads: the trained model, the class and domain it scores."""

    unused: ClassVar[tuple[str, ...]] = ("seed",)  # RuntimeConfig flags a command has no use for

    checkpoint: Path = redefault(ModelSource, "checkpoint", None, required=True)
    batch_size: int = setting(
        8, "images per forward (tiles per forward with --tile)", kind=RUN, minimum=1
    )
    class_name: list[str] | None = setting(
        None,
        "the class (prompt name) of the images (default: the calibration's, else the class the "
        "checkpoint's run trained, else 'object'); export takes several, chosen per image by "
        "the graph's class_index input",
        kind=RUN,
    )
    domain: str | None = setting(
        None,
        "the images' domain, e.g. AA-CLIP's blur (default: the calibration's, else the training "
        "data set's)",
        kind=RUN,
        choices=DOMAINS,
    )

    def one_class(self) -> str | None:
        """The one `--class_name` of a command that scores one class (None: not given)."""
        if self.class_name and len(self.class_name) > 1:
            raise ConfigError(
                f"--class_name {' '.join(self.class_name)}: this command scores one class; "
                "name one (export takes several)"
            )
        return self.class_name[0] if self.class_name else None


@dataclasses.dataclass
class DecisionConfig:
    """How a score becomes a decision (calibrate and export record it; score reuses it)."""

    rule: str | None = setting(
        None,
        "decision rule: the image score, the pixel (map) score, either or both above their "
        "thresholds (default: calibrate and export image; score the calibration's)",
        kind=RUN,
        choices=calib.RULES,
    )
    reduction: str | None = setting(
        None,
        "map score: max or topk_mean of the valid pixels (default: calibrate and export max; "
        "score the calibration's)",
        kind=RUN,
        choices=calib.REDUCTIONS,
    )


@dataclasses.dataclass
class ThresholdConfig(DecisionConfig):
    """How normal images set the thresholds (calibrate, and export on its own graph)."""

    percentile: float = setting(
        99.5, "99.5 (more sensitive) or 99.9, any p in 0-100", kind=RUN, minimum=0, maximum=100
    )
    top_fraction: float = setting(
        0.01, "topk_mean: fraction of the valid pixels", kind=RUN, above=0, maximum=1
    )

    def decision(self) -> tuple[str, str]:
        """(rule, reduction) a calibration records: the given ones, else image and max."""
        return self.rule or "image", self.reduction or "max"


def score_images(
    predictor: Predictor,
    dataset: ImageFolder,
    class_name: str,
    batch_size: int = 8,
    num_workers: int | None = None,
    top_fraction: float = 0.01,
    show_progress: bool = True,
) -> Iterator[tuple[ImageItem, dict[str, Any] | None]]:
    """Yield (item, result) per file in order, from the one prediction stream; result is None
    for an unreadable file, else {"image_score", "max", "topk_mean", "mean", "anomaly_map"} (the
    reductions over valid pixels only: padding is masked out of them and cropped from pictures,
    not set to 0, since AA-CLIP's raw maps can be negative and 0 would be a high value). A native
    predictor (tiles) maps each image `[H, W]` at its own resolution, and the item then keeps a
    preview of the image (`original`), not the image: the full one is freed once scored."""
    loader = item_loader(dataset, predictor, batch_size, num_workers)
    for result in predict_images(predictor, loader, class_name, show_progress):
        item = result.item
        if result.error:
            yield item, None
            continue
        anomaly_map = torch.from_numpy(result.anomaly_map)[None]  # [1, h, w]
        valid = torch.ones(anomaly_map.shape, dtype=torch.bool)
        if result.valid is not None:
            valid = torch.from_numpy(result.valid)[None]
        reductions = calib.reduce_maps(anomaly_map, valid, top_fraction)
        scores = {name: float(values[0]) for name, values in reductions.items()}
        if predictor.native:
            item.original = np.asarray(preview(Image.fromarray(item.original)), dtype=np.uint8)
        yield item, {"image_score": result.image_score, **scores, "anomaly_map": result.anomaly_map}
