"""AA-CLIP + cross-attention: the user's fork (wei-paul/AA-CLIP, branch cross_attention_feedback
@ 5722abf: `model/adapter_cross_attention.py`, `train_cross_attention.py`). Its losses are
AA-CLIP's, and so is what it learns from image labels alone (models/aaclip.py).

Two modules join AA-CLIP, both inserted after block 0 of their tower, before adapter 0, through the
walker hook: `text_cross_attn` (text tokens attend to an image context, stage 1) and
`image_cross_attn` (all vision tokens attend to the class's text context, stage 2). Each branch is
norm-matched to the token it perturbs and added with weight 0.1. Contexts are arguments of the
forward calls (`encode_text(ids, image_context)`, `forward(images, text_context)`), never state.

The fork's quirks (numbered as in the README's table) and the settings that reproduce or correct
them:
* Q1 a freshly added Xavier branch perturbs the base model by ~10% of each token's norm before
  any training: `cross_attn_init="xavier"` reproduces it; the default `"gated"` multiplies each
  branch by a learnable scalar gate initialised at 0, so step 0 equals the base model exactly.
* Q2 the fork never uses the modules at test: `cross_attn_at_test="none"` reproduces that;
  default `"image"` applies the image cross-attention with the class's text context (as trained);
  `"both"` also conditions each image's text anchors on that image.
* Q3 text prompts see the mean context over the whole image batch unless the prompt count equals
  the batch size (then prompt n sees image n): `image_context_pairing="batch_mean"` (the fork)
  reproduces it; `"per_class_mean"` lets each class see its own images.
* Q4 the text context's keys include padding after end-of-text: `text_context_key_mask=True`
  masks them (default False, as the fork).
* Q6 the fork reused a stale `text_context_dict.pth`; contexts are always recomputed here.
* Q7 the fork fell back silently to random adapters when base loading failed; loading is strict.
* Q8 the fork's attention dropout (0.1) never ran (the model stays in eval mode); none here.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from datasets.catalog import DatasetInfo, prompt_names
from models import backbone
from models.aaclip import AAClip, AAClipConfig
from models.adapters import residual_blend
from models.base import AnomalyOutput, Stage
from models.forward_utils import get_adapted_single_class_text_embedding
from models.prompts import build_prompts
from utils.core.config import ARCH, TEST, setting
from utils.core.errors import CheckpointError
from utils.core.runtime import float32_island

logger = logging.getLogger(__name__)

NORM_EPS = 1e-6
INITS = ("gated", "xavier")
TEST_MODES = ("image", "none", "both")


@dataclasses.dataclass
class AAClipCrossAttnConfig(AAClipConfig):
    """AA-CLIP's settings plus the cross-attention modules'."""

    name: ClassVar[str] = "aaclip_cross_attn"
    run_defaults: ClassVar[dict[str, Any]] = {
        **AAClipConfig.run_defaults,
        "save_path": Path("ckpt/cross_attention"),
    }
    # Every AA-CLIP and run setting not given comes from the base run (seed 001's fair
    # comparison), image adapter first.
    base_checkpoints: ClassVar[tuple[str, ...]] = (
        "load_base_image_adapter",
        "load_base_text_adapter",
    )
    inherits: ClassVar[type | None] = AAClipConfig

    cross_attn_heads: int = setting(
        8,
        "heads of both cross-attention modules (must divide the text width)",
        kind=ARCH,
        minimum=1,
    )
    cross_attn_weight_text: float = setting(0.1, "residual weight of text_cross_attn", kind=ARCH)
    cross_attn_weight_image: float = setting(0.1, "residual weight of image_cross_attn", kind=ARCH)
    cross_attn_norm_match: bool = setting(
        True, "rescale each branch output to its token's norm (the fork's fix)", kind=ARCH
    )
    cross_attn_init: str = setting(
        "gated",
        "gated: a learnable gate at 0 keeps step 0 equal to the base; xavier: the fork",
        kind=ARCH,
        choices=INITS,
    )
    text_context_normalize: bool = setting(
        True, "L2-normalise the text-context tokens (the fork's fix)", kind=ARCH
    )
    text_context_key_mask: bool = setting(
        False,
        "mask text-context positions after end-of-text (the fork attends to padding)",
        kind=ARCH,
    )
    cross_attn_at_test: str = setting(
        "image",
        "image: the image cross-attention at test; none: the fork (modules unused); both: also "
        "per-image text anchors",
        kind=TEST,
        choices=TEST_MODES,
    )
    image_context_pairing: str = setting(
        "batch_mean",
        "batch_mean: the fork (all images averaged, or prompt n paired with image n when the "
        "counts match); per_class_mean: each class's anchors see its own images' mean",
        choices=("batch_mean", "per_class_mean"),
    )
    load_base_text_adapter: Path | None = setting(
        None, "the base AA-CLIP run's text_adapter.pth (ours or the original code's)"
    )
    load_base_image_adapter: Path | None = setting(
        None, "the base AA-CLIP run's image_adapter.pth (ours or the original code's)"
    )
    carry_base_optimizer: bool = setting(
        True,
        "start the adapters from the base run's Adam moments (seed 001); the fork reset them",
    )


class ClassText(NamedTuple):
    """What `predict` needs of a class: anchors and the text context its images attend to."""

    anchors: torch.Tensor  # [D, 2]
    context: torch.Tensor  # [16 * 77, D_t]
    key_mask: torch.Tensor  # [16 * 77] bool, True up to each prompt's end-of-text token


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens over context tokens (the fork's module).

    `q_proj: D_q -> D_i`, `k_proj`, `v_proj: D_c -> D_i`, `out_proj: D_i -> D_q`, all with bias;
    Xavier-uniform weights and zero biases as the fork. State-dict keys are the fork's.
    """

    def __init__(self, query_dim: int, context_dim: int, inner_dim: int, heads: int) -> None:
        super().__init__()
        if inner_dim % heads:
            raise ValueError(
                f"cross_attn_heads {heads} must divide the attention width {inner_dim}"
            )
        self.heads = heads
        self.q_proj = nn.Linear(query_dim, inner_dim)
        self.k_proj = nn.Linear(context_dim, inner_dim)
        self.v_proj = nn.Linear(context_dim, inner_dim)
        self.out_proj = nn.Linear(inner_dim, query_dim)
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x `[B, L, D_q]`, context `[B, L_c, D_c]`, key_mask `[B, L_c]` (True = attend)
        -> `[B, L, D_q]`."""
        batch, length, _ = x.shape

        def split(tokens: torch.Tensor) -> torch.Tensor:  # [B, n, D_i] -> [B, h, n, D_i / h]
            return tokens.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(context)), split(self.v_proj(context)), mask
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))


def text_batch_context(context: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """The fork's text-side batch rule (its `model/adapter_cross_attention.py`): `[B_i, L, D]`
    is used as is when B_i equals the prompt count (prompt n sees image n), else averaged over
    the images and broadcast -> `[num_prompts, L, D]`."""
    if context.shape[0] == num_prompts:
        return context
    return context.mean(dim=0, keepdim=True).expand(num_prompts, -1, -1)


def image_batch_context(context: torch.Tensor, batch: int) -> torch.Tensor:
    """The fork's image-side rule: a single context is broadcast; otherwise batches match."""
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, -1, -1)
    raise ValueError(f"text context batch {context.shape[0]} does not match the {batch} images")


class AAClipCrossAttn(AAClip):
    """AA-CLIP plus `text_cross_attn` and `image_cross_attn` (see the module docstring;
    settings: `AAClipCrossAttnConfig`)."""

    config_class = AAClipCrossAttnConfig
    checkpoint_file = "image_adapter_cross_attn.pth"
    # The fork's own files evaluate as the fork did: its modules unused at test (Q2).
    original_defaults: ClassVar[dict[str, Any]] = {"cross_attn_at_test": "none"}
    log_file = "train_cross_attention.log"
    stage_stems: ClassVar[tuple[str, str]] = ("text_adapter_cross_attn", "image_adapter_cross_attn")

    def __init__(
        self, config: AAClipCrossAttnConfig | None = None, clip: CLIP | None = None
    ) -> None:
        config = config if config is not None else AAClipCrossAttnConfig()
        super().__init__(config, clip)
        width_t = backbone.text_width(self.clipmodel)
        width_v = backbone.vision_width(self.clipmodel)
        dim = backbone.embed_dim(self.clipmodel)
        heads = config.cross_attn_heads
        # Text queries over image context (joint-space patch features); image queries over text
        # tokens. With ViT-L-14-336 these are the fork's 768/1024 shapes.
        self.text_cross_attn = CrossAttention(width_t, dim, width_t, heads)
        self.image_cross_attn = CrossAttention(width_v, width_t, width_t, heads)
        gated = config.cross_attn_init == "gated"
        self.text_cross_attn_gate = nn.Parameter(torch.zeros(())) if gated else None
        self.image_cross_attn_gate = nn.Parameter(torch.zeros(())) if gated else None
        self.stage_contexts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bases: dict[str, dict[str, Any]] = {}  # the base checkpoints, by adapter

    # ---------------------------------------------------------------------------------------
    # The residual branch

    def _branch(
        self, x: torch.Tensor, attended: torch.Tensor, weight: float, gate: nn.Parameter | None
    ) -> torch.Tensor:
        """`x + weight * gate * c`, c norm-matched to x per token. `[B, L, D]`."""
        if self.config.cross_attn_norm_match:
            scale = x.norm(dim=-1, keepdim=True) / (attended.norm(dim=-1, keepdim=True) + NORM_EPS)
            attended = attended * scale
        scale = weight if gate is None else weight * gate
        return x + scale * attended

    # ---------------------------------------------------------------------------------------
    # Text

    def encode_text(
        self, token_ids: torch.Tensor, image_context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """AA-CLIP's adapted text path; with `image_context` `[B_i, L, D]` the tokens after text
        block 0 attend to it (batch rule of `text_batch_context`). `[N, 77]` -> `[N, D]`."""
        if image_context is None:
            return super().encode_text(token_ids)
        context = text_batch_context(image_context, token_ids.shape[0])

        def cross(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if index != 0:
                return tokens
            attended = self.text_cross_attn(tokens, context.to(tokens.dtype))
            return self._branch(
                tokens, attended, self.config.cross_attn_weight_text, self.text_cross_attn_gate
            )

        return self._encode_text(token_ids, cross)

    @torch.no_grad()
    def class_text_context(self, prompt_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A class's text context: its 16 prompts through text block 0 and adapter 0 (no
        cross-attention), tokens L2-normalised -> (`[16 * 77, D_t]`, key mask `[16 * 77]`, True
        up to each prompt's end-of-text token)."""
        clip = self.clipmodel
        sentences = [sentence for group in build_prompts(prompt_name) for sentence in group]
        token_ids = self.tokenize(sentences).to(self.device)  # [16, 77]
        x = backbone.walk_text(clip, backbone.text_embed(clip, token_ids), stop=1)
        if self.use_text_adapter and self.config.text_adapt_until > 0:
            x = residual_blend(x, self.text_adapter[0](x), self.config.text_adapt_weight)
        if self.config.text_context_normalize:
            x = F.normalize(x, dim=-1)
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        keep = positions[None, :] <= token_ids.argmax(dim=-1, keepdim=True)  # [16, 77]
        return x.flatten(0, 1), keep.flatten()

    def stack_contexts(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image (context, key mask) pairs of `class_text_context` -> contexts
        `[B, 16 * 77, D_t]` and key masks `[B, 16 * 77]` (None unless `text_context_key_mask`)."""
        context = torch.stack([pair[0] for pair in pairs])
        mask = (
            torch.stack([pair[1] for pair in pairs]) if self.config.text_context_key_mask else None
        )
        return context, mask

    # ---------------------------------------------------------------------------------------
    # Image

    def encode_image(
        self,
        images: torch.Tensor,
        text_context: torch.Tensor | None = None,
        text_key_mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """AA-CLIP's adapted image path; with `text_context` `[B or 1, L_c, D_t]` every token
        after vision block 0 attends to it. Returns AA-CLIP's (seg tokens per level, det token)."""
        if text_context is None:
            return super().encode_image(images)
        context = image_batch_context(text_context, images.shape[0])
        mask = (
            None
            if text_key_mask is None
            else image_batch_context(text_key_mask[..., None], images.shape[0])[..., 0]
        )

        def cross(index: int, tokens: torch.Tensor) -> torch.Tensor:
            if index != 0:
                return tokens
            attended = self.image_cross_attn(tokens, context.to(tokens.dtype), mask)
            return self._branch(
                tokens, attended, self.config.cross_attn_weight_image, self.image_cross_attn_gate
            )

        return self._encode_image(images, cross)

    def forward(
        self,
        images: torch.Tensor,
        text_context: torch.Tensor | None = None,
        text_key_mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Training forward = `encode_image` (stage 2 passes the batch's text contexts)."""
        return self.encode_image(images, text_context, text_key_mask)

    # ---------------------------------------------------------------------------------------
    # Inference

    def class_text(self, prompt_name: str) -> ClassText:
        """A class's anchors (without image context) and text context."""
        return ClassText(super().class_text(prompt_name), *self.class_text_context(prompt_name))

    def _predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        texts: ClassText,
        valid_mask: torch.Tensor | None,
        memory: Any,
        domain: str,
    ) -> AnomalyOutput:
        """AA-CLIP's maps and scores with the cross-attention used as `cross_attn_at_test` says.

        `none`: exactly the base AA-CLIP computation. `image`: the image path attends to each
        image's class text context. `both`: also per-image anchors conditioned on the image's
        stage-1 context (first-level surgery features; 16 text forwards per image).
        images: `[B, 3, S, S]` -> (`[B, S, S]`, `[B]`).
        """
        mode = self.config.cross_attn_at_test
        if mode == "none":
            seg_tokens, det_token = self.encode_image(images)
        else:
            mask = texts.key_mask if self.config.text_context_key_mask else None
            seg_tokens, det_token = self.encode_image(images, texts.context, mask)
        if mode != "both":
            anchors = texts.anchors.to(images.device)
            return self.maps_and_scores(seg_tokens, det_token, anchors, domain)
        image_context = self.surgery_features(images)[0][0]  # [B, g², D]
        with float32_island(images.device):
            anchors = torch.stack(
                [
                    get_adapted_single_class_text_embedding(
                        self,
                        name.replace("_", " "),  # as AAClip.class_text reads a name
                        images.device,
                        image_context=image_context[i : i + 1],
                    )
                    for i, name in enumerate(class_names)
                ]
            )
        return self.maps_and_scores(seg_tokens, det_token, anchors, domain)

    # ---------------------------------------------------------------------------------------
    # Training

    def stage_modules(self, stage: Stage) -> list[nn.Module | nn.Parameter]:
        """A stage's adapter first (the base's optimizer order), then its module and gate."""
        gate = getattr(self, f"{stage.name}_cross_attn_gate")
        modules = [*super().stage_modules(stage), getattr(self, f"{stage.name}_cross_attn")]
        return modules + ([gate] if gate is not None else [])

    def prepare_training(self, trust: bool = False) -> None:
        """Load the base adapters (strict; ours or the original code's) and log the weight
        check; their Adam moments seed each stage's optimizer (`start_optimizer`)."""
        config = self.config
        paths = {
            "text_adapter": config.load_base_text_adapter,
            "image_adapter": config.load_base_image_adapter,
        }
        self.bases = {
            key: self.load_base(key, path, trust) for key, path in paths.items() if path is not None
        }
        if not self.bases:
            logger.warning(
                "no --load_base_* checkpoints: the adapters start from scratch, so a comparison "
                "with a base model is not fair (seed 001)"
            )
        log_weight_check(self, self.bases)

    def start_optimizer(self, stage: Stage, optimizer: torch.optim.Optimizer) -> None:
        """The stage's adapter starts from the base run's Adam moments (`carry_base_optimizer`,
        seed 001; the fork reset them); the cross-attention parameters start fresh."""
        key = f"{stage.name}_adapter"
        if self.config.carry_base_optimizer and key in self.bases:
            path = getattr(self.config, f"load_base_{key}")
            state = self.bases[key][f"{stage.name}_optimizer"]
            count = len(list(getattr(self, key).parameters()))
            carry_optimizer_state(optimizer, state, count, path)

    def prepare_stage(self, stage: Stage, dataset: str | DatasetInfo) -> None:
        """Stage 2 also fixes each class's text context from the trained text adapter 0."""
        super().prepare_stage(stage, dataset)
        if stage.name == "image":
            self.stage_contexts = {
                name: self.class_text_context(prompt)
                for name, prompt in prompt_names(dataset).items()
            }

    def skip_stage(self, stage: Stage) -> bool:
        """`--text_epoch 0`: keep the (base) text adapter beside the image checkpoints."""
        return stage.name == "text"

    def stage1_image_contexts(
        self, patch_features: list[torch.Tensor], class_names: list[str], classes: list[str]
    ) -> list[torch.Tensor]:
        """The first level's stage-1 features `[B, g², D]`, per class of the batch: the whole
        batch (`batch_mean`, the fork) or the class's own images' mean."""
        context = patch_features[0]
        if self.config.image_context_pairing == "batch_mean":
            return [context] * len(classes)
        return [
            context[[i for i, name in enumerate(class_names) if name == wanted]].mean(
                dim=0, keepdim=True
            )
            for wanted in classes
        ]

    def stage2_inputs(self, class_names: list[str]) -> dict[str, Any]:
        context, mask = self.stack_contexts([self.stage_contexts[name] for name in class_names])
        return {"text_context": context, "text_key_mask": mask}

    def stage_state(self, stage: Stage) -> dict[str, Any]:
        """The adapter, the stage's module under the fork's key, and the gate when gated."""
        state = {
            **super().stage_state(stage),
            f"{stage.name}_cross_attn": getattr(self, f"{stage.name}_cross_attn").state_dict(),
        }
        gate = getattr(self, f"{stage.name}_cross_attn_gate")
        if gate is not None:
            state[f"{stage.name}_cross_attn_gate"] = gate.detach().clone()
        return state

    def load_stage_state(self, stage: Stage, payload: dict[str, Any], path: Path) -> None:
        """A fine-tuned stage (ours or the fork's): the adapter and its cross-attention module
        (+ gate). Strict; a mismatch names the setting."""
        super().load_stage_state(stage, payload, path)
        key = f"{stage.name}_cross_attn"
        if key not in payload:
            msg = f"{path} holds no '{key}' weights; is it a base AA-CLIP checkpoint?"
            raise CheckpointError(msg)
        try:
            getattr(self, key).load_state_dict(payload[key])
        except RuntimeError as error:
            msg = f"{path} has {key} weights of another size; check --cross_attn_heads/--model_name"
            raise CheckpointError(msg) from error
        gate = getattr(self, f"{key}_gate")
        saved_gate = payload.get(f"{key}_gate")
        if (gate is None) != (saved_gate is None):
            init = "xavier" if saved_gate is None else "gated"
            raise CheckpointError(
                f"{path} was trained with cross_attn_init={init}; pass --cross_attn_init {init}"
            )
        if gate is not None:
            gate.data.copy_(saved_gate)

    @classmethod
    def is_original(cls, payload: dict[str, Any]) -> bool:
        """The fork's files: AA-CLIP's plus its `text_cross_attn` / `image_cross_attn`."""
        return "image_cross_attn" in payload or "text_cross_attn" in payload

    @classmethod
    def original_settings(
        cls, path: Path, payload: dict[str, Any], trust: bool = False
    ) -> dict[str, Any]:
        """AA-CLIP's, and the fork's initialisation: no gate in the file means Xavier (Q1)."""
        settings = super().original_settings(path, payload, trust)
        gated = "image_cross_attn_gate" in payload or "text_cross_attn_gate" in payload
        return {**settings, "cross_attn_init": "gated" if gated else "xavier"}

    def load_base(self, key: str, path: Path, trust: bool = False) -> dict[str, Any]:
        """A base AA-CLIP adapter (`text_adapter` or `image_adapter`; ours or the original
        code's), strictly; returns its checkpoint."""
        payload = self.load_adapter(path, key, config_class=AAClipConfig, trust=trust)
        logger.info("base %s loaded from %s", key, path)
        return payload


def log_weight_check(model: AAClipCrossAttn, bases: dict[str, dict]) -> None:
    """Seed 001 step 5, done right: log each module's mean |weight| and the base checkpoints'
    epochs. Magnitudes cannot tell a trained adapter from a fresh one (Xavier gives ~0.03 for
    768 x 768 and stage 1 moves weights by < 0.01); the epoch against the base run's own total
    can, so an unfinished base is a warning."""
    for name in ("text_adapter", "image_adapter", "text_cross_attn", "image_cross_attn"):
        weights = [p for p in getattr(model, name).parameters() if p.dim() > 1]
        magnitude = sum(p.abs().mean().item() for p in weights) / len(weights)
        logger.info("weight check: %s mean |w| %.6f", name, magnitude)
    for key, payload in bases.items():
        total_key = "text_epoch" if key == "text_adapter" else "image_epoch"
        total = (payload.get("config") or {}).get(total_key)
        epoch = payload.get("epoch")
        logger.info("weight check: base %s after epoch %s of %s", key, epoch, total or "?")
        if total is not None and epoch is not None and epoch < total:
            logger.warning("the base %s is unfinished (epoch %s of %s)", key, epoch, total)


def carry_optimizer_state(
    optimizer: torch.optim.Optimizer, base_state: dict, count: int, path: Path
) -> None:
    """Give the optimizer's first `count` parameters (the adapters, in the base's order) the base
    run's Adam moments; the cross-attention parameters keep a fresh state."""
    base_ids = base_state["param_groups"][0]["params"]
    if len(base_ids) != count:
        msg = f"{path} optimizer holds {len(base_ids)} parameters, the adapters {count}"
        raise CheckpointError(f"{msg}; pass --no-carry_base_optimizer")
    state = optimizer.state_dict()
    state["state"] = {
        new_id: base_state["state"][old_id]
        for new_id, old_id in enumerate(base_ids)
        if old_id in base_state["state"]
    }
    optimizer.load_state_dict(state)
