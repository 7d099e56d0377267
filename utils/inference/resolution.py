"""Maps at each image's own resolution from any model-input predictor (`AnomalyPredictor`, or an
export's `ExportedPredictor`), one image at a time:

* `NativePredictor`: the whole image resized to the input, its map resized back (bilinear)
  over the region the model saw (`Geometry.to_image`): what test.py scores MVTec AD 2 with
  without tiles (`--metric_resolution native`), against the full-resolution masks;
* `TiledPredictor`: tiled inference at native resolution, the tiles of an image scored in
  batches through the predictor's one `predict` and their maps blended into one map
  (`datasets.tiling`: grid, window, stitcher).

Scores of a tiled image:
* the image score (`predict_image`'s, the field score that calibrate and score threshold) is
  the maximum over the image's tiles of their image scores (`tile_image_score`): a defect seen
  by one tile makes the image anomalous, as the map's maximum does;
* the paper-table score (test.py) is each model's own rule (`table_image_scores`) applied to the
  stitched maps' extrema and these image scores, as for whole images.

What the model sees of an image (`inputs`: the whole image, or its tiles at the same scale) is
also what a k-shot memory is built from (`support_images`) and what int8 is calibrated on, so
support, calibration and test patches share one resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datasets.preprocessing import Preprocessing, read_image
from datasets.tiling import Stitcher, TileBatch, TileConfig, Tiler, resize_map
from models.base import AnomalyOutput, MapExtrema
from utils.inference.predictor import ImageOutput, Predictor, spread


def tile_image_score(scores: torch.Tensor) -> float:
    """The image score of a tiled image from its tiles' image scores `[T]`: their maximum."""
    return float(scores.max())


class NativePredictor:
    """Scores an image of any size through `predictor`, whole, its map at the image's own
    resolution; its preprocessing, domain, amp, device, support and paper-table rule are the
    predictor's."""

    native = True
    tiling: dict[str, Any] | None = None

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @property
    def preprocessing(self) -> Preprocessing:
        return self.predictor.preprocessing

    @property
    def domain(self) -> str:
        return self.predictor.domain

    @property
    def amp(self) -> str:
        return self.predictor.amp

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def needs_support(self) -> bool:
        return self.predictor.needs_support

    def check_classes(self, class_names: list[str]) -> None:
        """Refuse classes the wrapped predictor cannot score."""
        self.predictor.check_classes(class_names)

    def predict(
        self, images: torch.Tensor, class_names: list[str], valid_mask: torch.Tensor | None = None
    ) -> AnomalyOutput:
        """Model-input batches, as the wrapped predictor scores them."""
        return self.predictor.predict(images, class_names, valid_mask)

    def inputs(self, image: Image.Image, limit: int | None = None) -> TileBatch:
        """What the model sees of an RGB image: the whole image, prepared `[1, 3, S, S]`."""
        return self.predictor.inputs(image, limit)

    def support_images(self, paths: list[Path]) -> torch.Tensor:
        """The support images as the model sees test images: `[N, 3, S, S]`."""
        pad_color = self.preprocessing.pad_color
        return torch.cat([self.inputs(read_image(path, pad_color)).images for path in paths])

    def set_support(self, images: torch.Tensor | None) -> None:
        """The k-shot memory from `support_images` `[N, 3, S, S]` (None clears)."""
        self.predictor.set_support(images)

    @torch.no_grad()
    def predict_image(self, image: Image.Image, class_name: str) -> ImageOutput:
        """An RGB image of any size -> its map `[H, W]` (the input-size map resized bilinearly
        over the region the model saw) and its image score."""
        prepared = self.preprocessing(image)
        output = self.predictor.predict(
            prepared.image[None], [class_name], prepared.valid_mask[None]
        )
        anomaly_map = prepared.geometry.to_image(output.anomaly_map[0].float().cpu().numpy())
        return ImageOutput(anomaly_map, float(output.image_score[0]))

    def table_image_scores(self, extrema: MapExtrema, scores: np.ndarray) -> np.ndarray:
        """The model's paper-table rule on the full-resolution maps' extrema `[N]` and the image
        scores `[N]`."""
        return self.predictor.table_image_scores(extrema, scores)


class TiledPredictor(NativePredictor):
    """Scores whole images at native resolution through `predictor` by tiles, `batch_size`
    tiles per `predict`."""

    def __init__(self, predictor: Predictor, tiling: TileConfig, batch_size: int) -> None:
        super().__init__(predictor)
        self.tiler = Tiler(predictor.preprocessing, tiling)
        self.tiling = tiling.tiling()
        self.batch_size = batch_size

    def inputs(self, image: Image.Image, limit: int | None = None) -> TileBatch:
        """The tiles of an RGB image (scaled here), prepared: `[T, 3, S, S]`; at most `limit`,
        spread over the image."""
        scaled = self.tiler.scaled(image)
        return self.tiler.batch(scaled, spread(self.tiler.positions(scaled), limit))

    @torch.no_grad()
    def predict_image(self, image: Image.Image, class_name: str) -> ImageOutput:
        """An RGB image of any size -> its map `[H, W]` at its own resolution (the tiles'
        blend) and its image score (`tile_image_score`)."""
        scaled = self.tiler.scaled(image)
        stitcher = Stitcher(scaled.height, scaled.width, self.tiler.size)
        scores = []
        for batch in self.tiler.batches(scaled, self.batch_size):
            names = [class_name] * len(batch.positions)
            output = self.predictor.predict(batch.images, names, batch.valid_mask)
            for tile_map, (top, left) in zip(
                self.tiler.to_tile(output.anomaly_map), batch.positions, strict=True
            ):
                stitcher.add(tile_map, top, left)
            scores.append(output.image_score.float().cpu())
        anomaly_map = stitcher.result()
        if scaled.size != image.size:
            anomaly_map = resize_map(anomaly_map, image.height, image.width)
        return ImageOutput(anomaly_map, tile_image_score(torch.cat(scores)))


def at_resolution(
    predictor: Predictor, tiling: TileConfig, batch_size: int, native: bool = False
) -> Predictor:
    """`predictor` over tiles when `tiling.tile` is set, else with maps at each image's own
    resolution when `native`, else `predictor` itself (maps at the model input)."""
    if tiling.tile:
        return TiledPredictor(predictor, tiling, batch_size)
    return NativePredictor(predictor) if native else predictor
