"""AA-CLIP: Enhancing Zero-Shot Anomaly Detection via Anomaly-Aware CLIP (Ma et al., CVPR 2025).

Original code: github.com/Mwxinnn/AA-CLIP @ 53db195. Spec: specs/aaclip.md. Stage 1 trains
residual text adapters (anomaly-aware anchors) against frozen "surgery" patch features; stage 2
trains residual image adapters after the first vision blocks plus per-level projections.

Quirks of the original reproduced here by default, each with the setting that corrects it:
* `surgery_attention="batch_mix"`: the stage-1 value-value attention softmaxes over the images of
  the batch instead of the tokens of an image (§8.3); `"per_image"` corrects it.
* `relu=False`: seg/det projections are plain linear maps (the CLI default the published runs
  used), so checkpoint keys are `fc.weight`; `relu=True` is the class default of the original.
* Stage-1 patch features are `normalize(f) + normalize(cls)`, not re-normalised (§8.4), and the
  detection token is a mean of unit vectors, not re-normalised (§7).
* The final text projection is a new trainable map; CLIP's `text_projection` is unused (§5).
Training-loop quirks (stage-1 loss on the last level only, un-scaled CE logits) live in train.py.

Unlike the original, one CLIP instance serves both the adapted path and the stage-1 surgery path:
the walker swaps the attention rule per call, and the blocks before the first surgery block are
computed once for both the clean CLS and the surgery features.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from models import backbone
from models.adapters import SimpleAdapter, SimpleProj, residual_blend, xavier_init
from utils.checkpoint import check_config, load_checkpoint
from utils.errors import CheckpointError
from utils.forward_utils import calculate_similarity_map, get_adapted_single_class_text_embedding
from utils.metrics import aaclip_image_scores

logger = logging.getLogger(__name__)

SURGERY_ATTENTION = {"batch_mix": "vv_batch_mix", "per_image": "vv_per_image"}
# Settings a checkpoint must share with the model it is loaded into.
TEXT_ADAPTER_KEYS = ("model", "model_name", "quick_gelu", "text_adapt_until", "text_adapt_weight")
IMAGE_ADAPTER_KEYS = (
    "model",
    "model_name",
    "quick_gelu",
    "img_size",
    "levels",
    "image_adapt_until",
    "image_adapt_weight",
    "relu",
)


class AnomalyOutput(NamedTuple):
    """What every model's `predict` returns; unpacks as a pair."""

    anomaly_map: torch.Tensor  # [B, S, S] float32
    image_score: torch.Tensor  # [B] float32


def default_levels(num_blocks: int) -> list[int]:
    """1-based block outputs at quarter depths: [6, 12, 18, 24] for 24 blocks."""
    return [num_blocks // 4, num_blocks // 2, 3 * num_blocks // 4, num_blocks]


class AdaptedCLIP(nn.Module):
    """Frozen CLIP plus AA-CLIP's text and image adapters.

    Args:
        clip_model: a plain open_clip CLIP (frozen here).
        text_adapt_weight: blend weight of the text residual adapters (λ, 0.1).
        image_adapt_weight: blend weight of the image residual adapters (λ, 0.1).
        text_adapt_until: number of text blocks followed by an adapter (K_T, 3).
        image_adapt_until: number of vision blocks followed by an adapter (K_I, 6).
        levels: 1-based vision block outputs used for segmentation ([6, 12, 18, 24]).
        relu: LeakyReLU after the seg/det projections (original CLI default False).
        surgery_until_layer: stage-1 value-value attention in the last `surgery_until_layer - 1`
            vision blocks (20: 0-based blocks 5..23 of 24).
        surgery_attention: `batch_mix` (faithful quirk) or `per_image`.
    """

    def __init__(
        self,
        clip_model: CLIP,
        text_adapt_weight: float = 0.1,
        image_adapt_weight: float = 0.1,
        text_adapt_until: int = 3,
        image_adapt_until: int = 6,
        levels: list[int] | tuple[int, ...] = (6, 12, 18, 24),
        relu: bool = False,
        surgery_until_layer: int = 20,
        surgery_attention: str = "batch_mix",
    ) -> None:
        super().__init__()
        blocks = backbone.num_vision_blocks(clip_model)
        levels = list(levels)
        if sorted(levels) != levels or not 1 <= levels[0] or levels[-1] > blocks:
            raise ValueError(f"levels {levels} must be increasing 1-based indices <= {blocks}")
        if image_adapt_until > levels[0]:
            raise ValueError(f"image_adapt_until {image_adapt_until} exceeds the first level")
        if text_adapt_until > backbone.num_text_blocks(clip_model):
            raise ValueError(f"text_adapt_until {text_adapt_until} exceeds the text depth")
        if surgery_attention not in SURGERY_ATTENTION:
            raise ValueError(f"surgery_attention must be one of {sorted(SURGERY_ATTENTION)}")
        if not 1 <= surgery_until_layer <= blocks + 1:
            raise ValueError(f"surgery_until_layer must be in 1..{blocks + 1}")

        self.clipmodel = backbone.freeze(clip_model)
        self.t_w = text_adapt_weight
        self.i_w = image_adapt_weight
        self.text_adapt_until = text_adapt_until
        self.image_adapt_until = image_adapt_until
        self.levels = levels
        self.relu = relu
        self.surgery_until_layer = surgery_until_layer
        self.surgery_attention = surgery_attention
        self.use_text_adapter = True
        self.domain = "Industrial"
        self.tokenizer = backbone.get_tokenizer()
        self._token_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.class_text_features: dict[str, torch.Tensor] = {}

        width_v = backbone.vision_width(clip_model)
        width_t = backbone.text_width(clip_model)
        dim = backbone.embed_dim(clip_model)
        # The final text projection always has LeakyReLU (hard-coded relu=True in the original).
        self.text_adapter = nn.ModuleList(
            [SimpleAdapter(width_t, width_t) for _ in range(text_adapt_until)]
            + [SimpleProj(width_t, dim, relu=True)]
        )
        self.image_adapter = nn.ModuleDict(
            {
                "layer_adapters": nn.ModuleList(
                    [SimpleAdapter(width_v, width_v) for _ in range(image_adapt_until)]
                ),
                "seg_proj": nn.ModuleList([SimpleProj(width_v, dim, relu) for _ in levels]),
                "det_proj": SimpleProj(width_v, dim, relu),
            }
        )
        xavier_init(self.text_adapter)
        xavier_init(self.image_adapter)

    # ---------------------------------------------------------------------------------------
    # Modes: CLIP is frozen and stays in eval mode; only adapters follow train()/eval().

    def train(self, mode: bool = True) -> AdaptedCLIP:
        super().train(mode)
        self.clipmodel.eval()
        return self

    @property
    def img_size(self) -> int:
        return backbone.image_size(self.clipmodel)

    @property
    def device(self) -> torch.device:
        return self.clipmodel.visual.proj.device

    # ---------------------------------------------------------------------------------------
    # Text

    def tokenize(self, sentences: list[str]) -> torch.Tensor:
        """Token ids `[N, 77]`, cached per sentence list (stage 1 re-encodes them every step)."""
        key = tuple(sentences)
        if key not in self._token_cache:
            self._token_cache[key] = self.tokenizer(sentences)
        return self._token_cache[key]

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Adapted text path (spec §5). `[N, 77]` -> `[N, D]`, not normalised.

        Residual adapters follow the first `text_adapt_until` blocks (on all 77 positions); the
        end-of-text token goes through the trainable final projection. With
        `use_text_adapter=False` (no stage 1) this is plain CLIP `encode_text`.
        """
        return self._encode_text(token_ids)

    def _encode_text(
        self, token_ids: torch.Tensor, before_adapter: backbone.BlockHook | None = None
    ) -> torch.Tensor:
        """`encode_text` with `before_adapter(i, x)` run after text block i, before its adapter
        (the cross-attention variant's insertion point; only on the adapted path)."""
        clip = self.clipmodel
        x = backbone.text_embed(clip, token_ids)  # [N, 77, D_t]
        if not self.use_text_adapter:
            return backbone.text_project(
                clip, backbone.text_pool(clip, backbone.walk_text(clip, x), token_ids)
            )

        def adapt(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if before_adapter is not None:
                tokens = before_adapter(index, tokens)
            if index < self.text_adapt_until:
                return residual_blend(tokens, self.text_adapter[index](tokens), self.t_w)
            return tokens

        pooled = backbone.text_pool(clip, backbone.walk_text(clip, x, adapt), token_ids)  # [N, D_t]
        return self.text_adapter[-1](pooled)  # [N, D]

    # ---------------------------------------------------------------------------------------
    # Image, adapted path (stage 2, test, predict)

    def encode_image(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Adapted image path (spec §7).

        images: `[B, 3, S, S]` -> (seg tokens: one `[B, g², D]` unit-norm tensor per level,
        det token `[B, D]`, the mean of unit vectors, norm <= 1).
        """
        return self._encode_image(images)

    def _encode_image(
        self, images: torch.Tensor, before_adapter: backbone.BlockHook | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`encode_image` with `before_adapter(i, x)` run after vision block i, before its
        adapter (the cross-attention variant's insertion point)."""
        clip = self.clipmodel
        adapters = self.image_adapter["layer_adapters"]
        level_tokens: list[torch.Tensor] = []

        def adapt_and_record(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if before_adapter is not None:
                tokens = before_adapter(index, tokens)
            if index < self.image_adapt_until:
                tokens = residual_blend(tokens, adapters[index](tokens), self.i_w)
            if index + 1 in self.levels:
                level_tokens.append(tokens[:, 1:])  # patch tokens after this block's adapter
            return tokens

        x = backbone.vision_embed(clip, images)  # [B, 1+g², D_v]
        backbone.walk_vision(clip, x, adapt_and_record, stop=self.levels[-1])
        normed = [backbone.post_norm(clip, tokens) for tokens in level_tokens]  # [B, g², D_v]
        seg_tokens = [
            F.normalize(projection(tokens), dim=-1)
            for projection, tokens in zip(self.image_adapter["seg_proj"], normed, strict=True)
        ]  # each [B, g², D]
        det_token = F.normalize(self.image_adapter["det_proj"](normed[-1]), dim=-1).mean(dim=1)
        return seg_tokens, det_token

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Training forward = `encode_image`."""
        return self.encode_image(images)

    # ---------------------------------------------------------------------------------------
    # Stage-1 features: frozen CLIP with value-value attention (no adapters, no gradient)

    def surgery_blocks(self) -> range:
        """0-based vision blocks whose attention the surgery replaces (the last `until - 1`)."""
        blocks = backbone.num_vision_blocks(self.clipmodel)
        return range(blocks - (self.surgery_until_layer - 1), blocks)

    @torch.no_grad()
    def surgery_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stage-1 patch features per level `[B, g², D]` and the clean CLS embedding `[B, D]`.

        Patch features are `normalize(ln_post(tokens) @ proj) + normalize(encode_image(images))`
        (spec §8.4), not re-normalised; the surgery walk shares its first (standard) blocks with
        the clean walk that yields the CLS embedding, so they are computed once.
        """
        clip = self.clipmodel
        first_surgery = self.surgery_blocks().start
        rule = SURGERY_ATTENTION[self.surgery_attention]
        level_tokens: list[torch.Tensor] = []

        def record(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if index + 1 in self.levels:
                level_tokens.append(tokens[:, 1:])
            return tokens

        x = backbone.vision_embed(clip, images)
        shared = backbone.walk_vision(clip, x, record, stop=first_surgery)  # common prefix
        clean = backbone.walk_vision(clip, shared, start=first_surgery)
        cls = F.normalize(backbone.vision_pool(clip, clean), dim=-1)  # [B, D]
        backbone.walk_vision(
            clip,
            shared,
            record,
            attention=lambda _: rule,
            start=first_surgery,
            stop=self.levels[-1],
        )
        patch_features = [
            F.normalize(backbone.project_image_tokens(clip, tokens), dim=-1) + cls[:, None, :]
            for tokens in level_tokens
        ]
        return patch_features, cls

    def surgery_patch_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Stage-1 patch features (spec §8.4): one `[B, g², D]` tensor per level."""
        return self.surgery_features(images)[0]

    # ---------------------------------------------------------------------------------------
    # Inference

    def text_features_for(self, class_names: list[str]) -> torch.Tensor:
        """Class anchors per image: `[B, D, 2]`.

        `class_names` are prompt names (e.g. "metal nut"); anchors missing from the cache are
        computed once, in float32 and without gradient, and cached.
        """
        for name in dict.fromkeys(class_names):
            if name not in self.class_text_features:
                with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                    self.class_text_features[name] = get_adapted_single_class_text_embedding(
                        self, None, name, self.device
                    )
        return torch.stack([self.class_text_features[name] for name in class_names])

    def set_class_text_features(self, features: dict[str, torch.Tensor]) -> None:
        """Replace the anchor cache `{prompt name: [D, 2]}` used by `predict`."""
        self.class_text_features = dict(features)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: list[str]) -> AnomalyOutput:
        """Raw test-time outputs (no test-set normalisation).

        images: `[B, 3, S, S]` -> anomaly map `[B, S, S]` (sum over levels of the blurred
        abnormal-minus-normal maps, spec §9) and image score `[B]` = `(det · t_abnormal + 1) / 2`.
        """
        text = self.text_features_for(class_names).to(images.device)  # [B, D, 2]
        return self.maps_and_scores(*self.encode_image(images), text)

    def maps_and_scores(
        self, seg_tokens: list[torch.Tensor], det_token: torch.Tensor, text: torch.Tensor
    ) -> AnomalyOutput:
        """Test-time map (sum of the levels' blurred maps) `[B, S, S]` and detection score `[B]`
        from seg tokens `[B, g², D]` per level, det token `[B, D]` and anchors `[B, D, 2]`."""
        anomaly_map = sum(
            calculate_similarity_map(tokens, text, self.img_size, test=True, domain=self.domain)
            for tokens in seg_tokens
        )[:, 0]  # [B, S, S]
        with torch.autocast(text.device.type, enabled=False):
            det_score = torch.matmul(det_token.float().unsqueeze(1), text.float())[:, 0, 1]  # [B]
        return AnomalyOutput(anomaly_map, (det_score + 1) / 2)

    @staticmethod
    def table_image_scores(maps: np.ndarray, scores: np.ndarray, domain: str) -> np.ndarray:
        """Paper-table image scores of one class from `predict`'s maps `[N, S, S]` and scores
        `[N]`: AA-CLIP's per-class min-max fusion (transductive; test.py only)."""
        return aaclip_image_scores(maps, scores, domain)


def build_aaclip(config: dict, device: torch.device | str = "cpu") -> AdaptedCLIP:
    """AdaptedCLIP from a run config (CLI args or a checkpoint's `config`)."""
    return AdaptedCLIP(clip_from_config(config, device), **aaclip_settings(config)).to(device)


def clip_from_config(config: dict, device: torch.device | str = "cpu") -> CLIP:
    """The frozen CLIP a run config names (`model_name`, `pretrained`, `img_size`, `quick_gelu`)."""
    return backbone.load_clip(
        config["model_name"],
        pretrained=config.get("pretrained", "openai"),
        img_size=config["img_size"],
        quick_gelu=config.get("quick_gelu", False),
        device=device,
    )


def aaclip_settings(config: dict) -> dict:
    """AdaptedCLIP's constructor arguments from a run config."""
    return {
        "text_adapt_weight": config["text_adapt_weight"],
        "image_adapt_weight": config["image_adapt_weight"],
        "text_adapt_until": config["text_adapt_until"],
        "image_adapt_until": config["image_adapt_until"],
        "levels": config["levels"],
        "relu": config["relu"],
        "surgery_until_layer": config.get("surgery_until_layer", 20),
        "surgery_attention": config.get("surgery_attention", "batch_mix"),
    }


def load_adapter(model: AdaptedCLIP, path, key: str, config: dict) -> dict:
    """Load `text_adapter` or `image_adapter` weights from our or the original's checkpoint.

    Our checkpoints carry their config, compared key by key with `config`; the original's do
    not, so a mismatch is diagnosed from the weights (e.g. `fc.0.weight` means relu=True).
    Returns the checkpoint dict.
    """
    payload = load_checkpoint(path, map_location=model.device)
    if key not in payload:
        raise CheckpointError(f"{path} holds no '{key}' weights (keys: {sorted(payload)})")
    keys = TEXT_ADAPTER_KEYS if key == "text_adapter" else IMAGE_ADAPTER_KEYS
    check_config(path, payload.get("config"), {"model": "aaclip", **config}, keys)
    module = model.text_adapter if key == "text_adapter" else model.image_adapter
    try:
        module.load_state_dict(payload[key])
    except RuntimeError as error:
        raise CheckpointError(_diagnose_mismatch(path, key, payload[key], model)) from error
    return payload


def _diagnose_mismatch(path, key: str, state: dict, model: AdaptedCLIP) -> str:
    """One sentence naming the flag a checkpoint without config was trained with."""
    if key == "image_adapter":
        relu = any(name.startswith("seg_proj.") and ".fc.0." in name for name in state)
        if relu != model.relu:
            return f"{path} was trained with relu={relu}; pass {'--relu' if relu else '--no-relu'}"
        adapters = len({name.split(".")[1] for name in state if name.startswith("layer_adapters.")})
        if adapters != model.image_adapt_until:
            return (
                f"{path} has {adapters} image layer adapters; pass --image_adapt_until {adapters}"
            )
        levels = len({name.split(".")[1] for name in state if name.startswith("seg_proj.")})
        if levels != len(model.levels):
            return f"{path} has {levels} seg projections; pass --levels with {levels} values"
    else:
        adapters = len({name.split(".")[0] for name in state}) - 1  # last one: the projection
        if adapters != model.text_adapt_until:
            return f"{path} has {adapters} text adapters; pass --text_adapt_until {adapters}"
    return f"{path} has weights of another size than this backbone; check --model_name"


def from_checkpoint(
    path: Path, device: torch.device | str = "cpu", overrides: dict | None = None
) -> tuple[AdaptedCLIP, dict]:
    """An AdaptedCLIP ready for `predict`, rebuilt from our `image_adapter*.pth`.

    The stored config rebuilds the backbone; `text_adapter.pth` beside the file is loaded when
    present (else plain CLIP anchors, with a warning). Returns (model in eval mode, payload).
    """
    path = Path(path)
    payload = load_checkpoint(path)
    config = payload.get("config")
    if config is None:
        msg = (
            f"{path} has no stored config (original AA-CLIP format); evaluate it with test.py "
            "and the backbone flags it was trained with"
        )
        raise CheckpointError(msg)
    config = {**config, **(overrides or {})}
    model = build_aaclip(config, device)
    text_path = path.parent / "text_adapter.pth"
    if text_path.is_file():
        load_adapter(model, text_path, "text_adapter", config)
    else:
        logger.warning("no %s: text anchors come from plain CLIP (no stage 1)", text_path)
        model.use_text_adapter = False
    load_adapter(model, path, "image_adapter", config)
    return model.eval(), payload
