"""AA-CLIP: Enhancing Zero-Shot Anomaly Detection via Anomaly-Aware CLIP (Ma et al., CVPR 2025).

Original code: github.com/Mwxinnn/AA-CLIP @ 53db195; paper: arXiv 2503.06661. Stage 1 trains
residual text adapters (anomaly-aware anchors) against frozen "surgery" patch features; stage 2
trains residual image adapters after the first vision blocks plus per-level projections.

Quirks of the original reproduced here by default, each with the setting that corrects it:
* `surgery_attention="batch_mix"`: the stage-1 value-value attention softmaxes over the images of
  the batch instead of the tokens of an image (the attention `visual.DAPM_replace` installs);
  `"per_image"` corrects it.
* `relu=False`: seg/det projections are plain linear maps (the CLI default the published runs
  used), so checkpoint keys are `fc.weight`; `relu=True` is the class default of the original.
* Stage-1 patch features are `normalize(f) + normalize(cls)`, not re-normalised
  (`train.py::train_text_adapter`), and the detection token is a mean of unit vectors, not
  re-normalised (`model/adapter.py::AdaptedCLIP.forward`).
* The final text projection is a new trainable map; CLIP's `text_projection` is unused
  (`AdaptedCLIP.encode_text`).
* `stage1_loss="last_level"`: the original overwrites the loss inside its level loop, so only the
  last level's segmentation loss (+ one orthogonal term) trains the text adapters;
  `"sum_levels"` sums all levels. The paper's stage-1 L_cls is absent; `stage1_cls_loss` adds it.
* `cls_logit_scale=1`: stage-2 cross-entropy on un-scaled cosine logits.
Resume follows the corrected rule (train while epoch < total, optimizer, scheduler and RNG states
restored); the original skipped a stage-1 epoch and restarted the scheduler (`train.py::main`).

Image labels alone: stage 2 has an image-level loss (cross-entropy on the detection token), so an
anomalous image without a mask trains it from its label while the segmentation terms skip it
(per sample). Stage 1 has none by default (the original trains the text adapters on masks only):
records without any defect mask are refused in one line unless `stage1_cls_loss` adds the
paper's L_cls.

Unlike the original, one CLIP instance serves both the adapted path and the stage-1 surgery path:
the walker swaps the attention rule per call, and the blocks before the first surgery block are
computed once for both the clean CLS and the surgery features.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from datasets.catalog import DEFAULT_DOMAIN, DatasetInfo, check_domain, prompt_names, real_name
from models import backbone
from models.adapters import SimpleAdapter, SimpleProj, residual_blend, xavier_init
from models.base import AnomalyOutput, ClipConfig, FrozenCLIPModel, MapExtrema, Stage
from models.forward_utils import (
    calculate_seg_loss,
    calculate_similarity_map,
    get_adapted_single_class_text_embedding,
    get_adapted_text_embedding,
    known_masks,
    minmax_normalize,
    orthogonal_loss,
    pixel_loss,
)
from utils.core.checkpoint import load_checkpoint
from utils.core.config import ARCH, redefault, setting
from utils.core.errors import CheckpointError, ConfigError
from utils.core.runtime import float32_island

logger = logging.getLogger(__name__)

SURGERY_ATTENTION = {"batch_mix": "vv_batch_mix", "per_image": "vv_per_image"}


@dataclasses.dataclass
class AAClipConfig(ClipConfig):
    """AA-CLIP's settings (the original's defaults)."""

    name: ClassVar[str] = "aaclip"
    paper_img_size: ClassVar[int] = 518
    run_defaults: ClassVar[dict[str, Any]] = {"save_path": Path("ckpt/aaclip"), "seed": 111}

    block_indices: list[int] = redefault(
        ClipConfig,
        "block_indices",
        [5, 11, 17, 23],
        help="0-based vision blocks whose outputs are the segmentation levels (the original's "
        "1-based --levels 6 12 18 24)",
        aliases={"levels": 1},
        original="levels",
    )
    text_adapt_until: int = setting(
        3, "text blocks followed by a residual adapter (K_T)", kind=ARCH, minimum=0
    )
    image_adapt_until: int = setting(
        6, "vision blocks followed by a residual adapter (K_I)", kind=ARCH, minimum=0
    )
    text_adapt_weight: float = setting(0.1, "blend weight of the text adapters", kind=ARCH)
    image_adapt_weight: float = setting(0.1, "blend weight of the image adapters", kind=ARCH)
    relu: bool = setting(
        False, "LeakyReLU after the seg/det projections (the published runs: off)", kind=ARCH
    )
    surgery_until_layer: int = setting(
        20, "stage-1 value-value attention in the last N - 1 vision blocks", minimum=1
    )
    surgery_attention: str = setting(
        "batch_mix",
        "stage-1 value-value attention: batch_mix reproduces the original's softmax over the "
        "images of a batch; per_image corrects it",
        choices=tuple(SURGERY_ATTENTION),
    )
    stage1_loss: str = setting(
        "last_level",
        "last_level reproduces the original (only the last level's loss trains); sum_levels",
        choices=("last_level", "sum_levels"),
    )
    stage1_cls_loss: bool = setting(
        False, "add the paper's L_cls on the clean CLS embedding (absent in the code)"
    )
    text_norm_weight: float = setting(0.1, "weight of the orthogonal (disentangle) loss")
    text_epoch: int = setting(5, "stage-1 epochs", minimum=0)
    text_batch_size: int = setting(16, "stage-1 global batch size", minimum=1)
    text_lr: float = setting(1e-5, "stage-1 Adam learning rate", above=0)
    image_epoch: int = setting(20, "stage-2 epochs", minimum=0)
    image_batch_size: int = setting(2, "stage-2 global batch size", minimum=1)
    image_lr: float = setting(5e-4, "stage-2 Adam learning rate", above=0)
    image_milestones: list[int] = setting(
        [16000, 32000], "stage-2 MultiStepLR milestones in iterations", nargs="*", minimum=0
    )
    image_gamma: float = setting(0.5, "stage-2 MultiStepLR factor", above=0)
    cls_logit_scale: float = setting(
        1.0, "scale of the stage-2 CE logits (the original: 1, un-scaled cosines)"
    )
    betas: list[float] = setting([0.5, 0.999], "Adam betas of both stages", nargs=2, minimum=0)

    def check(self) -> None:
        levels = self.block_indices
        if levels and self.image_adapt_until > levels[0] + 1:
            msg = (
                f"--image_adapt_until {self.image_adapt_until} adapts blocks after the first "
                f"level (block {levels[0]}); use at most {levels[0] + 1}"
            )
            raise ConfigError(msg)


def aaclip_image_scores(extrema: MapExtrema, det_scores: np.ndarray, domain: str) -> np.ndarray:
    """AA-CLIP's image scores of one class (its `forward_utils.py::metrics_eval`) from its maps'
    extrema and detection scores `[N]`. Industrial: 0.5 * max of the class-min-max map + 0.5 *
    min-max detection score; Medical: the map maximum only. Transductive (test-set statistics):
    for paper tables only."""
    check_domain(domain)
    # min-max is monotone, so the max of the normalised map is the normalised max; the range is
    # the class's (every map's minimum and maximum), skipped when its maximum is exactly 1
    low, high = extrema.minima.min(), extrema.maxima.max()
    map_max = extrema.maxima if high == 1 or high == low else (extrema.maxima - low) / (high - low)
    map_max = np.asarray(map_max, dtype=np.float64)
    if domain == "Medical":
        return map_max
    return 0.5 * map_max + 0.5 * minmax_normalize(np.asarray(det_scores, dtype=np.float64))


class TextStageOutput(NamedTuple):
    """Stage 1's forward: frozen surgery features and the anchors with gradient."""

    patch_features: list[torch.Tensor]  # per level [B, g², D]
    cls: torch.Tensor  # [B, D] clean CLS embedding
    anchors: torch.Tensor  # [C, D, 2] one per class of the batch
    classes: list[str]  # the C classes, in first-appearance order


class ImageStageOutput(NamedTuple):
    """Stage 2's forward: the adapted image path."""

    seg_tokens: list[torch.Tensor]  # per level [B, g², D] unit norm
    det_token: torch.Tensor  # [B, D]


def stage1_loss(
    level_maps: list[torch.Tensor],
    mask: torch.Tensor,
    epoch_text_feature: torch.Tensor,
    text_norm_weight: float,
    mode: str = "last_level",
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage-1 loss: per-level train maps `[B, 2, S, S]`, mask `[B, 1, S, S]`, anchors `[B, D, 2]`;
    `known` `[B]` bool: the images whose mask is known (the segmentation terms skip the others).

    `last_level` (faithful): the original reassigns the loss per level, so only the last map
    counts; `sum_levels`: every level's segmentation loss. One orthogonal term either way.
    """
    orthogonal = text_norm_weight * orthogonal_loss(epoch_text_feature)
    known = known_masks({"mask": mask}) if known is None else known
    if mode == "last_level":
        return pixel_loss(calculate_seg_loss, known, level_maps[-1], mask) + orthogonal
    if mode == "sum_levels":
        seg = sum(pixel_loss(calculate_seg_loss, known, level, mask) for level in level_maps)
        return seg + orthogonal
    raise ConfigError(f"unknown --stage1_loss {mode!r}; use last_level or sum_levels")


def class_logits(
    features: torch.Tensor, epoch_text_feature: torch.Tensor, scale: float
) -> torch.Tensor:
    """`[B, D]` image features against their class anchors `[B, D, 2]` -> `[B, 2]` logits."""
    return scale * torch.matmul(features.unsqueeze(1), epoch_text_feature)[:, 0]


class AAClip(FrozenCLIPModel):
    """Frozen CLIP plus AA-CLIP's text and image adapters (the original's `AdaptedCLIP`;
    settings: `AAClipConfig`)."""

    config_class = AAClipConfig
    checkpoint_file = "image_adapter.pth"
    stage_stems: ClassVar[tuple[str, str]] = ("text_adapter", "image_adapter")

    def __init__(self, config: AAClipConfig | None = None, clip: CLIP | None = None) -> None:
        config = config if config is not None else AAClipConfig()
        super().__init__(config, clip)
        clip = self.clipmodel
        blocks = backbone.num_vision_blocks(clip)
        if config.text_adapt_until > backbone.num_text_blocks(clip):
            depth = backbone.num_text_blocks(clip)
            msg = f"--text_adapt_until {config.text_adapt_until} exceeds the {depth} text blocks"
            raise ConfigError(msg)
        if config.surgery_until_layer > blocks + 1:
            msg = f"--surgery_until_layer {config.surgery_until_layer} must be <= {blocks + 1}"
            raise ConfigError(msg)
        self.use_text_adapter = True
        self.tokenizer = backbone.get_tokenizer()
        self._token_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.train_dataset: str | DatasetInfo | None = None
        self.stage_text: dict[str, torch.Tensor] = {}
        self._sources: dict[str, str] = {}

        width_v = backbone.vision_width(clip)
        width_t = backbone.text_width(clip)
        dim = backbone.embed_dim(clip)
        # The final text projection always has LeakyReLU (hard-coded relu=True in the original).
        self.text_adapter = nn.ModuleList(
            [SimpleAdapter(width_t, width_t) for _ in range(config.text_adapt_until)]
            + [SimpleProj(width_t, dim, relu=True)]
        )
        self.image_adapter = nn.ModuleDict(
            {
                "layer_adapters": nn.ModuleList(
                    [SimpleAdapter(width_v, width_v) for _ in range(config.image_adapt_until)]
                ),
                "seg_proj": nn.ModuleList(
                    [SimpleProj(width_v, dim, config.relu) for _ in config.block_indices]
                ),
                "det_proj": SimpleProj(width_v, dim, config.relu),
            }
        )
        xavier_init(self.text_adapter)
        xavier_init(self.image_adapter)

    # ---------------------------------------------------------------------------------------
    # Text

    def tokenize(self, sentences: list[str]) -> torch.Tensor:
        """Token ids `[N, 77]`, cached per sentence list (stage 1 re-encodes them every step)."""
        key = tuple(sentences)
        if key not in self._token_cache:
            self._token_cache[key] = self.tokenizer(sentences)
        return self._token_cache[key]

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Adapted text path (the original's `AdaptedCLIP.encode_text`). `[N, 77]` -> `[N, D]`,
        not normalised.

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
        weight = self.config.text_adapt_weight

        def adapt(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if before_adapter is not None:
                tokens = before_adapter(index, tokens)
            if index < self.config.text_adapt_until:
                return residual_blend(tokens, self.text_adapter[index](tokens), weight)
            return tokens

        pooled = backbone.text_pool(clip, backbone.walk_text(clip, x, adapt), token_ids)  # [N, D_t]
        return self.text_adapter[-1](pooled)  # [N, D]

    # ---------------------------------------------------------------------------------------
    # Image, adapted path (stage 2, test, predict)

    def encode_image(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Adapted image path (the original's `AdaptedCLIP.forward`).

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
        levels = self.config.block_indices
        weight = self.config.image_adapt_weight
        level_tokens: list[torch.Tensor] = []

        def adapt_and_record(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if before_adapter is not None:
                tokens = before_adapter(index, tokens)
            if index < self.config.image_adapt_until:
                tokens = residual_blend(tokens, adapters[index](tokens), weight)
            if index in levels:
                level_tokens.append(tokens[:, 1:])  # patch tokens after this block's adapter
            return tokens

        x = backbone.vision_embed(clip, images)  # [B, 1+g², D_v]
        backbone.walk_vision(clip, x, adapt_and_record, stop=levels[-1] + 1)
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
        return range(blocks - (self.config.surgery_until_layer - 1), blocks)

    @torch.no_grad()
    def surgery_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stage-1 patch features per level `[B, g², D]` and the clean CLS embedding `[B, D]`.

        Patch features are `normalize(ln_post(tokens) @ proj) + normalize(encode_image(images))`
        (as `train.py::train_text_adapter`), not re-normalised; the surgery walk shares its first
        (standard) blocks with the clean walk that yields the CLS embedding, so they are computed
        once.
        """
        clip = self.clipmodel
        first_surgery = self.surgery_blocks().start
        rule = SURGERY_ATTENTION[self.config.surgery_attention]
        levels = self.config.block_indices
        level_tokens: list[torch.Tensor] = []

        def record(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if index in levels:
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
            stop=levels[-1] + 1,
        )
        patch_features = [
            F.normalize(backbone.project_image_tokens(clip, tokens), dim=-1) + cls[:, None, :]
            for tokens in level_tokens
        ]
        return patch_features, cls

    # ---------------------------------------------------------------------------------------
    # Inference

    @property
    def smoothing(self) -> str:
        return "gaussian on the patch grid (AA-CLIP)"

    def class_text(self, prompt_name: str) -> torch.Tensor:
        """A class's anchors `[D, 2]` (normal, abnormal), float32 and without gradient; `_` in
        the name reads as a space (a bare class name, as the catalogue's fallback)."""
        prompt = prompt_name.replace("_", " ")
        with torch.no_grad(), float32_island(self.device):
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
        """Anomaly map `[B, S, S]` (sum over levels of the blurred abnormal-minus-normal maps of
        `calculate_similarity_map`, the blur by `domain`) and image score `[B]` =
        `(det · t_abnormal + 1) / 2`; `texts`: the anchors `[B or 1, D, 2]`. `valid_mask` is not
        used (the predictor keeps padding out of its reductions)."""
        anchors = texts.to(images.device)
        return self.maps_and_scores(*self.encode_image(images), anchors, domain)

    def maps_and_scores(
        self,
        seg_tokens: list[torch.Tensor],
        det_token: torch.Tensor,
        text: torch.Tensor,
        domain: str = DEFAULT_DOMAIN,
    ) -> AnomalyOutput:
        """Test-time map (sum of the levels' blurred maps) `[B, S, S]` and detection score `[B]`
        from seg tokens `[B, g², D]` per level, det token `[B, D]` and anchors `[B, D, 2]`."""
        anomaly_map = sum(
            calculate_similarity_map(tokens, text, self.img_size, test=True, domain=domain)
            for tokens in seg_tokens
        )[:, 0]  # [B, S, S]
        with float32_island(text.device):
            det_score = torch.matmul(det_token.float().unsqueeze(1), text.float())[:, 0, 1]  # [B]
        return AnomalyOutput(anomaly_map, (det_score + 1) / 2)

    @classmethod
    def table_image_scores(
        cls, extrema: MapExtrema, scores: np.ndarray, domain: str, few_shot: bool
    ) -> np.ndarray:
        """AA-CLIP's per-class min-max fusion of map maxima and detection scores (transductive;
        test.py only)."""
        return aaclip_image_scores(extrema, scores, domain)

    # ---------------------------------------------------------------------------------------
    # Training: stage 1 (text adapters), stage 2 (image adapters)

    def stages(self) -> list[Stage]:
        config = self.config
        text_stem, image_stem = self.stage_stems
        return [
            Stage(
                "text",
                text_stem,
                config.text_epoch,
                config.text_batch_size,
                color_jitter=False,
                per_epoch_files=False,
                optimizer_key="text_optimizer",
                scheduler_key="text_scheduler",
                log_prefix="text ",
                lr_flag="--text_lr",
                title="train_text_adapter: the text adapters against frozen surgery features",
                image_loss=config.stage1_cls_loss,
                image_loss_flag="--stage1_cls_loss (the paper's L_cls, absent from the original)",
            ),
            Stage(
                "image",
                image_stem,
                config.image_epoch,
                config.image_batch_size,
                optimizer_key="image_optimizer",
                scheduler_key="image_scheduler",
                log_prefix="image ",
                lr_flag="--image_lr",
                title="train_image_adapter: the image adapters against the stage-1 anchors",
            ),
        ]

    def stage_modules(self, stage: Stage) -> list[nn.Module | nn.Parameter]:
        """What a stage trains, in the optimizer's order: first the stage's adapter."""
        return [self.text_adapter if stage.name == "text" else self.image_adapter]

    def trainable_parameters(self, stage: Stage) -> list[dict[str, Any]]:
        self.requires_grad_(False)
        groups = []
        for module in self.stage_modules(stage):
            params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
            for parameter in params:
                parameter.requires_grad_(True)
            groups.append(params)
        # One group per trained module after the adapter (the cross-attention variant's).
        first, rest = groups[0], [p for group in groups[1:] for p in group]
        return [{"params": first}] + ([{"params": rest}] if len(groups) > 1 else [])

    def configure_optimizer(
        self, stage: Stage
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        config = self.config
        lr = config.text_lr if stage.name == "text" else config.image_lr
        optimizer = torch.optim.Adam(
            self.trainable_parameters(stage), lr=lr, betas=tuple(config.betas)
        )
        if stage.name == "text":
            return optimizer, None
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=config.image_milestones, gamma=config.image_gamma
        )
        return optimizer, scheduler

    def prepare_stage(self, stage: Stage, dataset: str | DatasetInfo) -> None:
        """Stage 2 trains against the stage-1 anchors of every class, computed once, frozen."""
        self.train_dataset = dataset
        if stage.name == "image":
            self.eval()
            with torch.no_grad():
                self.stage_text = get_adapted_text_embedding(
                    self, prompt_names(dataset), self.device
                )  # keyed by class name, as the batches' class_name

    def skip_stage(self, stage: Stage) -> bool:
        if stage.name == "text":
            logger.info("--text_epoch 0: no stage 1, anchors from plain CLIP")
            self.use_text_adapter = False
        return False

    def stage1_image_contexts(
        self, patch_features: list[torch.Tensor], class_names: list[str], classes: list[str]
    ) -> list[torch.Tensor | None]:
        """Per class of the batch, the image context its anchors see (none in AA-CLIP)."""
        return [None] * len(classes)

    def stage2_inputs(self, class_names: list[str]) -> dict[str, Any]:
        """Extra keyword arguments of the stage-2 forward (none in AA-CLIP)."""
        return {}

    def forward_train(self, batch: dict[str, Any], stage: Stage) -> Any:
        if stage.name == "image":
            return ImageStageOutput(
                *self(batch["image"], **self.stage2_inputs(batch["class_name"]))
            )
        class_names = list(batch["class_name"])
        classes = list(dict.fromkeys(class_names))
        patch_features, cls = self.surgery_features(batch["image"])
        contexts = self.stage1_image_contexts(patch_features, class_names, classes)
        anchors = torch.stack(
            [
                get_adapted_single_class_text_embedding(
                    self, real_name(self.train_dataset, name), self.device, image_context=context
                )
                for name, context in zip(classes, contexts, strict=True)
            ]
        )  # [C, D, 2] with gradient through the text adapters
        return TextStageOutput(patch_features, cls, anchors, classes)

    def loss(self, output: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Stage 1: `stage1_loss` (+ L_cls with `stage1_cls_loss`); stage 2: CE on the detection
        token + focal/dice at every level. Float32."""
        config = self.config
        mask = batch["mask"]
        with float32_island(mask.device):
            if isinstance(output, TextStageOutput):
                classes = output.classes
                epoch_text_feature = output.anchors[
                    [classes.index(name) for name in batch["class_name"]]
                ].float()
                features = output.patch_features
                if config.stage1_loss == "last_level" and not config.stage1_cls_loss:
                    # The other levels' maps would be computed and discarded (no gradient).
                    features = features[-1:]
                level_maps = [
                    calculate_similarity_map(tokens, epoch_text_feature, self.img_size)
                    for tokens in features
                ]
                loss = stage1_loss(
                    level_maps,
                    mask,
                    epoch_text_feature,
                    config.text_norm_weight,
                    config.stage1_loss,
                    known_masks(batch),
                )
                if config.stage1_cls_loss:
                    logits = class_logits(
                        output.cls.float(), epoch_text_feature, config.cls_logit_scale
                    )
                    loss = loss + F.cross_entropy(logits, batch["label"])
                return {"loss": loss}
            epoch_text_feature = torch.stack(
                [self.stage_text[name] for name in batch["class_name"]]
            )
            logits = class_logits(
                output.det_token.float(), epoch_text_feature, config.cls_logit_scale
            )
            loss = F.cross_entropy(logits, batch["label"])
            known = known_masks(batch)
            for tokens in output.seg_tokens:
                level_map = calculate_similarity_map(tokens, epoch_text_feature, self.img_size)
                loss = loss + pixel_loss(calculate_seg_loss, known, level_map, mask)
            return {"loss": loss}

    # ---------------------------------------------------------------------------------------
    # Checkpoints: the original's keys (`text_adapter`, `image_adapter`)

    def stage_state(self, stage: Stage) -> dict[str, Any]:
        key = f"{stage.name}_adapter"
        return {key: getattr(self, key).state_dict()}

    def load_stage_state(self, stage: Stage, payload: dict[str, Any], path: Path) -> None:
        self.load_adapter(path, f"{stage.name}_adapter", payload)

    def load_adapter(
        self,
        path: Path,
        key: str,
        payload: dict[str, Any] | None = None,
        config_class: type | None = None,
        trust: bool = False,
    ) -> dict[str, Any]:
        """Load `text_adapter` or `image_adapter` weights from our or the original's checkpoint.

        Our checkpoints carry their config, checked against this model's (as `config_class`);
        the original's do not, so a mismatch is diagnosed from the weights (e.g. `fc.0.weight`
        means relu=True). Returns the checkpoint dict.
        """
        if payload is None:
            payload = load_checkpoint(path, map_location=self.device, trust=trust)
        if key not in payload:
            raise CheckpointError(f"{path} holds no '{key}' weights (keys: {sorted(payload)})")
        self.check_checkpoint(path, payload, config_class)
        module = self.text_adapter if key == "text_adapter" else self.image_adapter
        try:
            module.load_state_dict(payload[key])
        except RuntimeError as error:
            raise CheckpointError(self._diagnose_mismatch(path, key, payload[key])) from error
        self._sources[key] = str(path)
        return payload

    def _diagnose_mismatch(self, path: Path, key: str, state: dict) -> str:
        """One sentence naming the flag a checkpoint without config was trained with."""
        config = self.config
        if key == "image_adapter":
            relu = any(name.startswith("seg_proj.") and ".fc.0." in name for name in state)
            if relu != config.relu:
                flag = "--relu" if relu else "--no-relu"
                return f"{path} was trained with relu={relu}; pass {flag}"
            adapters = len(
                {name.split(".")[1] for name in state if name.startswith("layer_adapters.")}
            )
            if adapters != config.image_adapt_until:
                return (
                    f"{path} has {adapters} image layer adapters; pass --image_adapt_until "
                    f"{adapters}"
                )
            levels = len({name.split(".")[1] for name in state if name.startswith("seg_proj.")})
            if levels != len(config.block_indices):
                return f"{path} has {levels} seg projections; pass --levels with {levels} values"
        else:
            adapters = len({name.split(".")[0] for name in state}) - 1  # last: the projection
            if adapters != config.text_adapt_until:
                return f"{path} has {adapters} text adapters; pass --text_adapt_until {adapters}"
        return f"{path} has weights of another size than this backbone; check --model_name"

    @classmethod
    def is_original(cls, payload: dict[str, Any]) -> bool:
        """The original's files: `{text_adapter: ...}` or `{image_adapter: ...}` (+ optimizer,
        epoch)."""
        return "image_adapter" in payload or "text_adapter" in payload

    @classmethod
    def original_settings(
        cls, path: Path, payload: dict[str, Any], trust: bool = False
    ) -> dict[str, Any]:
        """What the original's files imply: `relu` (its projections' keys), the adapter counts."""
        settings: dict[str, Any] = {}
        image = payload.get("image_adapter") or {}
        if image:
            settings["relu"] = any(".fc.0." in key for key in image if key.startswith("seg_proj."))
            layers = {key.split(".")[1] for key in image if key.startswith("layer_adapters.")}
            settings["image_adapt_until"] = len(layers)
        text_file = Path(path).parent / f"{cls.stage_stems[0]}.pth"
        text = payload.get("text_adapter")
        if text is None and text_file.is_file():
            text = load_checkpoint(text_file, trust=trust).get("text_adapter")
        if text:
            settings["text_adapt_until"] = len({key.split(".")[0] for key in text}) - 1
        return settings

    def load_trained(
        self, path: Path, payload: dict[str, Any] | None = None, trust: bool = False
    ) -> dict[str, Any]:
        """An image-adapter file, and the stage-1 file beside it (plain CLIP anchors, with a
        warning, when there is none: the original fell back silently)."""
        path = Path(path)
        payload = load_checkpoint(path, trust=trust) if payload is None else payload
        text_stage, image_stage = self.stages()
        text_path = path.parent / f"{text_stage.stem}.pth"
        self._sources = {}
        if text_path.is_file():
            self.load_stage_state(text_stage, load_checkpoint(text_path, trust=trust), text_path)
            self.use_text_adapter = True
        else:
            logger.warning("no %s: text anchors come from plain CLIP (no stage 1)", text_path)
            self.use_text_adapter = False
            self._sources["text_adapter"] = "none (plain CLIP anchors)"
        self.load_stage_state(image_stage, payload, path)
        self.eval()
        return payload

    @property
    def weight_sources(self) -> dict[str, str]:
        return dict(self._sources)
