"""The predictor interface, and the predictor around a trained model.

Inference state lives apart from the model (segment-anything's `SamPredictor` beside `Sam`): the
model's preprocessing, the test domain, the cached class texts, the k-shot support memory, the
autocast setting and the paper-protocol image score. Every predictor (this one, an exported
graph's in `utils.inference.graph`, and the native-resolution and tiled ones of
`utils.inference.resolution` around either) answers the `Predictor` interface, so test.py,
calibrate, score and export see the same pixels on every path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image

from datasets.catalog import DEFAULT_DOMAIN, check_domain
from datasets.preprocessing import Preprocessing, read_image
from datasets.tiling import TileBatch
from models.base import AnomalyOutput, FrozenCLIPModel, MapExtrema
from utils.core.errors import ConfigError
from utils.core.runtime import autocast, resolve_amp


class ImageOutput(NamedTuple):
    """One image's prediction at its own resolution (whole or tiled)."""

    anomaly_map: np.ndarray  # [H, W] float32, the image's own resolution
    image_score: float


class Predictor(Protocol):
    """What scores images. `predict` runs model-input batches; a `native` predictor also maps
    a whole image at its own resolution (`predict_image`), which is how the stream uses it."""

    preprocessing: Preprocessing
    domain: str
    amp: str
    native: bool  # maps at each image's own resolution (predict_image), not at the model input
    tiling: dict[str, Any] | None  # the tiling results and calibrations record (None: whole)

    @property
    def device(self) -> torch.device: ...

    @property
    def needs_support(self) -> bool:
        """Whether k normal images of a class must be set (`set_support`) before predicting."""
        ...

    def predict(
        self, images: torch.Tensor, class_names: list[str], valid_mask: torch.Tensor | None = None
    ) -> AnomalyOutput: ...

    def predict_image(self, image: Image.Image, class_name: str) -> ImageOutput: ...

    def check_classes(self, class_names: list[str]) -> None: ...

    def inputs(self, image: Image.Image, limit: int | None = None) -> TileBatch: ...

    def support_images(self, paths: list[Path]) -> torch.Tensor: ...

    def set_support(self, images: torch.Tensor | None) -> None: ...

    def table_image_scores(self, extrema: MapExtrema, scores: np.ndarray) -> np.ndarray: ...


def spread(items: list[Any], limit: int | None) -> list[Any]:
    """At most `limit` of `items`, evenly spaced over them (all when `limit` is None)."""
    if limit is None or len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(index * step)] for index in range(limit)]


class InputPredictor:
    """What the predictors that run at the model input share: an image becomes one input
    through `preprocessing`, and the maps are at the input size."""

    preprocessing: Preprocessing
    native = False
    tiling: dict[str, Any] | None = None

    def check_classes(self, class_names: list[str]) -> None:
        """Refuse, in one line, classes this predictor cannot score (a model scores any)."""

    def inputs(self, image: Image.Image, limit: int | None = None) -> TileBatch:
        """What the model sees of an RGB image: its one prepared input `[1, 3, S, S]` and valid
        mask `[1, S, S]` (`limit` bounds tiles, of which there are none here)."""
        prepared = self.preprocessing(image)
        return TileBatch(prepared.image[None], prepared.valid_mask[None], [(0, 0)])

    def support_images(self, paths: list[Path]) -> torch.Tensor:
        """Support images read and prepared as the test images are: `[N, 3, S, S]`."""
        pad_color = self.preprocessing.pad_color
        return torch.cat([self.inputs(read_image(path, pad_color)).images for path in paths])


class AnomalyPredictor(InputPredictor):
    """Scores images with a trained model.

    Args:
        model: any registered model; put in eval mode here.
        domain: the data's domain ("Industrial" | "Medical"), e.g. AA-CLIP's test-time blur.
        amp: autocast for the model (`none`, `bf16`, `fp16`, or `auto`: bf16 where the device
            computes it natively); maps and scores stay float32.
        k_shot: support images per class; a k-shot predictor refuses to predict before
            `set_support`.

    `preprocessing` is the model's own (`model.preprocessing()`, which test-time overrides
    of `--preprocess`, `--pad_color`, ... have already changed): every reader prepares images
    with it, and letterboxed images hand their valid masks to the model.
    """

    def __init__(
        self,
        model: FrozenCLIPModel,
        domain: str = DEFAULT_DOMAIN,
        amp: str = "none",
        k_shot: int = 0,
    ) -> None:
        check_domain(domain)
        if k_shot < 0:
            raise ConfigError(f"--k_shot {k_shot} must be >= 0 (0 means zero-shot)")
        if k_shot and not model.supports_memory:
            msg = f"--k_shot {k_shot} needs a support memory (sowa), not {model.name}"
            raise ConfigError(msg)
        self.model = model.eval()
        self.preprocessing: Preprocessing = model.preprocessing()
        self.domain = domain
        self.amp = resolve_amp(amp, model.device)
        self.k_shot = k_shot
        self._text: dict[str, Any] = {}
        self._memory: Any = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def needs_support(self) -> bool:
        return self.k_shot > 0

    @torch.no_grad()
    def set_support(self, images: torch.Tensor | None) -> None:
        """The k normal support images `[k, 3, S, S]` of the class about to be predicted (None
        clears them)."""
        if images is None:
            self._memory = None
            return
        with autocast(self.device, self.amp):
            self._memory = self.model.encode_memory(images.to(self.device))

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        valid_mask: torch.Tensor | None = None,
    ) -> AnomalyOutput:
        """images `[B, 3, S, S]`, one prompt name per image, valid_mask `[B, S, S]` bool (False
        on letterbox padding; used when the preprocessing pads) -> anomaly map `[B, S, S]`, image
        score `[B]`, float32."""
        if self.k_shot and self._memory is None:
            raise RuntimeError(
                "A support set must be set with .set_support(images) before k-shot prediction."
            )
        images = images.to(self.device, non_blocking=True)  # pinned by the loaders on CUDA
        valid_mask = valid_mask if self.preprocessing.pads else None
        with autocast(self.device, self.amp):
            for name in dict.fromkeys(class_names):
                if name not in self._text:
                    self._text[name] = self.model.class_text(name)
            return self.model.predict(
                images,
                class_names,
                valid_mask,
                text=self._text,
                memory=self._memory,
                domain=self.domain,
            )

    def table_image_scores(self, extrema: MapExtrema, scores: np.ndarray) -> np.ndarray:
        """Paper-table image scores of one class from its `predict` maps' extrema (`[N]` each,
        `MapExtrema`) and scores `[N]` (the model's protocol, e.g.
        AA-CLIP's per-class min-max fusion: transductive, so for paper tables only)."""
        return self.model.table_image_scores(
            extrema, scores, self.domain, few_shot=self._memory is not None
        )
