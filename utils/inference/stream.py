"""The one per-image prediction stream: batches of `ImageItem`s in, one `ImageResult` per item
out, in order. test.py's evaluation and SegF1's validation thresholds, calibrate, score and an
export's in-folder calibration all read their maps and scores from `predict_images`; the k-shot
support and int8's calibration feeds come from the same `Predictor.inputs`, so every consumer
sees an image exactly as the others do.

A model-input predictor scores a batch's stacked images in one `predict` (maps `[S, S]` with
their valid masks); a native one maps each image at its own resolution (`predict_image`: maps
`[H, W]`, all valid). An unreadable item passes through as a result with its error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datasets.items import ImageItem, ItemBatch, collate_items
from utils.core.runtime import loader_workers, progress
from utils.inference.predictor import Predictor


class ImageResult(NamedTuple):
    """One item's prediction (or its error)."""

    item: ImageItem
    anomaly_map: np.ndarray | None  # [h, w] float32: the model input's [S, S], or the image's
    # own [H, W] from a native predictor; None for an unreadable item
    valid: np.ndarray | None  # [h, w] bool, False on letterbox padding; None: every pixel
    image_score: float  # nan for an unreadable item
    image: torch.Tensor | None = None  # [3, S, S] the model's input (model-input predictors)

    @property
    def error(self) -> str:
        return self.item.error


def item_loader(
    dataset: Dataset, predictor: Predictor, batch_size: int, num_workers: int | None = None
) -> DataLoader:
    """Batches of a reader's items for `predict_images`: `batch_size` images per batch at the
    model input, one at native resolution (each image is then its own forward, or its tiles'
    batches); loader workers as `loader_workers` decides for evaluation."""
    workers = loader_workers(num_workers, predictor.device, evaluation=True)
    return DataLoader(
        dataset,
        batch_size=1 if predictor.native else batch_size,
        num_workers=workers,
        pin_memory=predictor.device.type == "cuda",
        collate_fn=collate_items,
    )


@torch.no_grad()
def predict_images(
    predictor: Predictor,
    batches: Iterable[ItemBatch],
    class_name: str,
    show_progress: bool = True,
) -> Iterator[ImageResult]:
    """Each item of `batches` predicted under the prompt `class_name` -> its `ImageResult`, in
    order. Letterbox padding is handed to the model as the valid mask (FE-CLIP's masked LFS)
    and returned with the map, so no consumer scores it."""
    unit = "image" if predictor.native else "batch"
    for batch in progress(batches, show_progress, desc="images", unit=unit, leave=False):
        if predictor.native:
            yield from _native(predictor, batch.items, class_name)
            continue
        outputs = iter(())
        if batch.images is not None:
            names = [class_name] * len(batch.images)
            anomaly_map, image_score = predictor.predict(batch.images, names, batch.valid_mask)
            maps = anomaly_map.float().cpu().numpy()  # [b, S, S]
            scores = image_score.float().cpu().numpy()  # [b]
            valid = batch.valid_mask.numpy() if predictor.preprocessing.pads else None
            outputs = (
                (maps[row], None if valid is None else valid[row], float(scores[row]), image)
                for row, image in enumerate(batch.images)
            )
        for item in batch.items:
            if item.error:
                yield ImageResult(item, None, None, float("nan"))
            else:
                yield ImageResult(item, *next(outputs))


def _native(predictor: Predictor, items: list[ImageItem], class_name: str) -> Iterator[ImageResult]:
    """Each readable item's image (`original`, as read) mapped at its own resolution."""
    for item in items:
        if item.error:
            yield ImageResult(item, None, None, float("nan"))
            continue
        output = predictor.predict_image(Image.fromarray(item.original), class_name)
        yield ImageResult(item, output.anomaly_map, None, output.image_score)
