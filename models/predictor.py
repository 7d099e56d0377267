"""Inference state around a trained model, apart from it (segment-anything's `SamPredictor`
beside `Sam`): the model's preprocessing, the test domain, the cached class texts, the k-shot
support memory, the autocast setting, and the paper-protocol image score. test.py, predict.py and
the export all score through it, so one checkpoint sees the same pixels on every path.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from datasets.catalog import DEFAULT_DOMAIN, check_domain
from datasets.preprocessing import Preprocessing
from models.base import AnomalyOutput, FrozenCLIPModel, MapExtrema
from utils.core.errors import ConfigError
from utils.core.runtime import autocast, resolve_amp


class Predictor(Protocol):
    """What scores images: an `AnomalyPredictor` around a model, or a deployed graph's
    (`utils.deploy.export.ExportedPredictor`)."""

    preprocessing: Preprocessing
    domain: str
    amp: str

    @property
    def device(self) -> torch.device: ...

    def predict(
        self, images: torch.Tensor, class_names: list[str], valid_mask: torch.Tensor | None = None
    ) -> AnomalyOutput: ...

    def table_image_scores(self, extrema: MapExtrema, scores: np.ndarray) -> np.ndarray: ...


class AnomalyPredictor:
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
