"""A fifth model, for tests/test_fifth_model.py only: a linear probe on one vision block's patch
tokens of the frozen CLIP, compared with plain CLIP's (normal, abnormal) anchors of the class.

It is what a new method adds to the project: this file (copied to models/patchprobe.py), one
entry in models/registry.py and configs/patchprobe.yaml; the scripts train, evaluate, calibrate
and export it through the one interface without another change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from datasets.catalog import DatasetInfo, prompt_names
from models import backbone
from models.base import AnomalyOutput, ClipConfig, FrozenCLIPModel, SingleStageConfig, Stage
from models.forward_utils import (
    calculate_seg_loss,
    calculate_similarity_map,
    get_adapted_single_class_text_embedding,
    get_adapted_text_embedding,
)
from utils.core.config import redefault, setting
from utils.core.runtime import float32_island


@dataclasses.dataclass
class PatchProbeConfig(SingleStageConfig):
    """The probe's settings."""

    name: ClassVar[str] = "patchprobe"
    paper_img_size: ClassVar[int] = 224
    run_defaults: ClassVar[dict[str, Any]] = {"save_path": Path("ckpt/patchprobe")}

    block_indices: list[int] = redefault(
        ClipConfig, "block_indices", [23], help="the vision block whose patch tokens are probed"
    )
    lr: float = setting(1e-3, "Adam learning rate", above=0)


class PatchProbe(FrozenCLIPModel):
    """Frozen CLIP plus one Linear from patch tokens to the joint space (`PatchProbeConfig`)."""

    config_class = PatchProbeConfig
    checkpoint_file = "patchprobe.pth"

    def __init__(self, config: PatchProbeConfig | None = None, clip: CLIP | None = None) -> None:
        super().__init__(config if config is not None else PatchProbeConfig(), clip)
        self.probe = nn.Linear(
            backbone.vision_width(self.clipmodel), backbone.embed_dim(self.clipmodel)
        )
        self.tokenizer = backbone.get_tokenizer()
        self.stage_text: dict[str, torch.Tensor] = {}

    # text: plain CLIP, for forward_utils' anchors
    def tokenize(self, sentences: list[str]) -> torch.Tensor:
        return self.tokenizer(sentences)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.clipmodel.encode_text(token_ids)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` -> unit patch features `[B, g², D]`."""
        clip = self.clipmodel
        stop = self.config.block_indices[-1] + 1
        tokens = backbone.walk_vision(clip, backbone.vision_embed(clip, images), stop=stop)
        return F.normalize(self.probe(backbone.post_norm(clip, tokens[:, 1:])), dim=-1)

    @property
    def smoothing(self) -> str:
        return "gaussian on the patch grid (as AA-CLIP)"

    def class_text(self, prompt_name: str) -> torch.Tensor:
        with torch.no_grad(), float32_island(self.device):
            prompt = prompt_name.replace("_", " ")
            return get_adapted_single_class_text_embedding(self, prompt, self.device)

    def _predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        texts: torch.Tensor,
        valid_mask: torch.Tensor | None,
        memory: Any,
        domain: str,
    ) -> AnomalyOutput:
        anchors = texts.to(images.device)  # [B or 1, D, 2]
        features = self.patch_features(images)
        maps = calculate_similarity_map(features, anchors, self.img_size, test=True, domain=domain)
        anomaly_map = maps[:, 0]
        return AnomalyOutput(anomaly_map, anomaly_map.flatten(1).max(dim=1).values)

    def stages(self) -> list[Stage]:
        return [Stage("train", "patchprobe", self.config.epochs, self.config.batch_size)]

    def trainable_parameters(self, stage: Stage) -> list[dict[str, Any]]:
        self.requires_grad_(False)
        self.probe.requires_grad_(True)
        return [{"params": list(self.probe.parameters())}]

    def configure_optimizer(
        self, stage: Stage
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        return torch.optim.Adam(self.trainable_parameters(stage), lr=self.config.lr), None

    def prepare_stage(self, stage: Stage, dataset: str | DatasetInfo) -> None:
        with torch.no_grad():
            self.stage_text = get_adapted_text_embedding(self, prompt_names(dataset), self.device)

    def forward_train(self, batch: dict[str, Any], stage: Stage) -> torch.Tensor:
        return self.patch_features(batch["image"])

    def loss(self, output: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        anchors = torch.stack([self.stage_text[name] for name in batch["class_name"]])
        with float32_island(output.device):
            probs = calculate_similarity_map(output.float(), anchors.float(), self.img_size)
            return {"loss": calculate_seg_loss(probs, batch["mask"])}
