"""AA-CLIP + cross-attention: the user's fork (wei-paul/AA-CLIP, branch cross_attention_feedback
@ 5722abf). Spec: specs/cross_attention.md.

Two modules join AA-CLIP, both inserted after block 0 of their tower, before adapter 0, through the
walker hook: `text_cross_attn` (text tokens attend to an image context, stage 1) and
`image_cross_attn` (all vision tokens attend to the class's text context, stage 2). Each branch is
norm-matched to the token it perturbs and added with weight 0.1. Contexts are arguments of the
forward calls (`encode_text(ids, image_context)`, `forward(images, text_context)`), never state.

The fork's quirks (spec §8) and the settings that reproduce or correct them:
* Q1 a freshly added Xavier branch perturbs the base model by ~10% of each token's norm before
  any training: `cross_attn_init="xavier"` reproduces it; the default `"gated"` multiplies each
  branch by a learnable scalar gate initialised at 0, so step 0 equals the base model exactly.
* Q2 the fork never uses the modules at test: `cross_attn_at_test="none"` reproduces that;
  default `"image"` applies the image cross-attention with the class's text context (as trained);
  `"both"` also conditions each image's text anchors on that image.
* Q3 text prompts see the mean context over the whole image batch unless the prompt count equals
  the batch size (then prompt n sees image n): `image_context_pairing` in the training script.
* Q4 the text context's keys include padding after end-of-text: `text_context_key_mask=True`
  masks them (default False, as the fork).
* Q6 the fork reused a stale `text_context_dict.pth`; contexts are always recomputed here.
* Q7 the fork fell back silently to random adapters when base loading failed; loading is strict.
* Q8 the fork's attention dropout (0.1) never ran (the model stays in eval mode); none here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from models import backbone
from models.aaclip import (
    AdaptedCLIP,
    AnomalyOutput,
    aaclip_settings,
    clip_from_config,
    load_adapter,
)
from models.adapters import residual_blend
from models.prompts import build_prompts
from utils.checkpoint import check_config, load_checkpoint
from utils.errors import CheckpointError
from utils.forward_utils import get_adapted_single_class_text_embedding

logger = logging.getLogger(__name__)

MODEL_NAME = "aaclip_cross_attn"
NORM_EPS = 1e-6
CROSS_ATTN_KEYS = (
    "cross_attn_heads",
    "cross_attn_init",
    "cross_attn_norm_match",
    "cross_attn_weight_text",
    "cross_attn_weight_image",
    "text_context_normalize",
    "text_context_key_mask",
)
INITS = ("gated", "xavier")
TEST_MODES = ("image", "none", "both")


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
    """The fork's text-side batch rule (spec §2.1): `[B_i, L, D]` is used as is when
    B_i equals the prompt count (prompt n sees image n), else averaged over the images and
    broadcast -> `[num_prompts, L, D]`."""
    if context.shape[0] == num_prompts:
        return context
    return context.mean(dim=0, keepdim=True).expand(num_prompts, -1, -1)


def image_batch_context(context: torch.Tensor, batch: int) -> torch.Tensor:
    """The image-side rule (spec §2.2): a single context is broadcast; otherwise batches match."""
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, -1, -1)
    raise ValueError(f"text context batch {context.shape[0]} does not match the {batch} images")


class AdaptedCLIPWithCrossAttention(AdaptedCLIP):
    """AA-CLIP plus `text_cross_attn` and `image_cross_attn` (see the module docstring).

    Args beyond AdaptedCLIP's:
        cross_attn_heads: heads of both modules (8; must divide the text width).
        cross_attn_weight_text / cross_attn_weight_image: residual weights (0.1).
        cross_attn_norm_match: rescale each branch output to its token's norm (True).
        cross_attn_init: `gated` (learnable gate at 0) or `xavier` (the fork, no gate).
        text_context_normalize: L2-normalise every text-context token (True, the fork's fix).
        text_context_key_mask: mask text-context positions after end-of-text (False, fork).
        cross_attn_at_test: `image`, `none` (fork) or `both`, used by `predict`.
    """

    def __init__(
        self,
        clip_model: CLIP,
        cross_attn_heads: int = 8,
        cross_attn_weight_text: float = 0.1,
        cross_attn_weight_image: float = 0.1,
        cross_attn_norm_match: bool = True,
        cross_attn_init: str = "gated",
        text_context_normalize: bool = True,
        text_context_key_mask: bool = False,
        cross_attn_at_test: str = "image",
        **aaclip_settings,
    ) -> None:
        super().__init__(clip_model, **aaclip_settings)
        if cross_attn_init not in INITS:
            raise ValueError(f"cross_attn_init must be one of {INITS}")
        if cross_attn_at_test not in TEST_MODES:
            raise ValueError(f"cross_attn_at_test must be one of {TEST_MODES}")
        width_t = backbone.text_width(clip_model)
        width_v = backbone.vision_width(clip_model)
        dim = backbone.embed_dim(clip_model)
        # Text queries over image context (joint-space patch features); image queries over text
        # tokens. With ViT-L-14-336 these are the fork's 768/1024 shapes.
        self.text_cross_attn = CrossAttention(width_t, dim, width_t, cross_attn_heads)
        self.image_cross_attn = CrossAttention(width_v, width_t, width_t, cross_attn_heads)
        gated = cross_attn_init == "gated"
        self.text_cross_attn_gate = nn.Parameter(torch.zeros(())) if gated else None
        self.image_cross_attn_gate = nn.Parameter(torch.zeros(())) if gated else None
        self.cross_attn_weight_text = cross_attn_weight_text
        self.cross_attn_weight_image = cross_attn_weight_image
        self.cross_attn_norm_match = cross_attn_norm_match
        self.cross_attn_init = cross_attn_init
        self.text_context_normalize = text_context_normalize
        self.text_context_key_mask = text_context_key_mask
        self.cross_attn_at_test = cross_attn_at_test
        self.class_text_contexts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---------------------------------------------------------------------------------------
    # The residual branch

    def _branch(
        self, x: torch.Tensor, attended: torch.Tensor, weight: float, gate: nn.Parameter | None
    ) -> torch.Tensor:
        """`x + weight * gate * c`, c norm-matched to x per token (spec §3). `[B, L, D]`."""
        if self.cross_attn_norm_match:
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
                tokens, attended, self.cross_attn_weight_text, self.text_cross_attn_gate
            )

        return self._encode_text(token_ids, cross)

    @torch.no_grad()
    def class_text_context(self, prompt_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A class's text context (spec §4.2): its 16 prompts through text block 0 and adapter 0
        (no cross-attention), tokens L2-normalised -> (`[16 * 77, D_t]`, key mask `[16 * 77]`,
        True up to each prompt's end-of-text token). Cached per prompt name."""
        if prompt_name not in self.class_text_contexts:
            clip = self.clipmodel
            sentences = [sentence for group in build_prompts(prompt_name) for sentence in group]
            token_ids = self.tokenize(sentences).to(self.device)  # [16, 77]
            x = backbone.walk_text(clip, backbone.text_embed(clip, token_ids), stop=1)
            if self.use_text_adapter and self.text_adapt_until > 0:
                x = residual_blend(x, self.text_adapter[0](x), self.t_w)
            if self.text_context_normalize:
                x = F.normalize(x, dim=-1)
            positions = torch.arange(token_ids.shape[1], device=token_ids.device)
            keep = positions[None, :] <= token_ids.argmax(dim=-1, keepdim=True)  # [16, 77]
            self.class_text_contexts[prompt_name] = (x.flatten(0, 1), keep.flatten())
        return self.class_text_contexts[prompt_name]

    def text_contexts(self, prompt_names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image text contexts `[B, 16 * 77, D_t]` and key masks `[B, 16 * 77]` (None
        unless `text_context_key_mask`)."""
        pairs = [self.class_text_context(name) for name in prompt_names]
        context = torch.stack([pair[0] for pair in pairs])
        mask = torch.stack([pair[1] for pair in pairs]) if self.text_context_key_mask else None
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
                tokens, attended, self.cross_attn_weight_image, self.image_cross_attn_gate
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

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: list[str]) -> AnomalyOutput:
        """AA-CLIP's maps and scores with the cross-attention used as `cross_attn_at_test` says.

        `none`: exactly the base AA-CLIP computation. `image`: the image path attends to each
        image's class text context. `both`: also per-image anchors conditioned on the image's
        stage-1 context (first-level surgery features; 16 text forwards per image).
        images: `[B, 3, S, S]` -> (`[B, S, S]`, `[B]`).
        """
        if self.cross_attn_at_test == "none":
            return super().predict(images, class_names)
        context, mask = self.text_contexts(class_names)
        seg_tokens, det_token = self.encode_image(images, context, mask)
        if self.cross_attn_at_test == "image":
            text = self.text_features_for(class_names).to(images.device)
        else:
            image_context = self.surgery_features(images)[0][0]  # [B, g², D]
            with torch.autocast(images.device.type, enabled=False):
                text = torch.stack(
                    [
                        get_adapted_single_class_text_embedding(
                            self, None, name, images.device, image_context=image_context[i : i + 1]
                        )
                        for i, name in enumerate(class_names)
                    ]
                )
        return self.maps_and_scores(seg_tokens, det_token, text)

    def cross_attention_state(self, stage: str) -> dict:
        """Checkpoint entries of a stage's cross-attention (`text` or `image`): the module's state
        under the fork's key, plus the gate when gated."""
        module = self.text_cross_attn if stage == "text" else self.image_cross_attn
        gate = self.text_cross_attn_gate if stage == "text" else self.image_cross_attn_gate
        state = {f"{stage}_cross_attn": module.state_dict()}
        if gate is not None:
            state[f"{stage}_cross_attn_gate"] = gate.detach().clone()
        return state


def build_cross_attention(
    config: dict, device: torch.device | str = "cpu"
) -> AdaptedCLIPWithCrossAttention:
    """AdaptedCLIPWithCrossAttention from a run config (CLI args or a checkpoint's `config`)."""
    model = AdaptedCLIPWithCrossAttention(
        clip_from_config(config, device),
        cross_attn_heads=config.get("cross_attn_heads", 8),
        cross_attn_weight_text=config.get("cross_attn_weight_text", 0.1),
        cross_attn_weight_image=config.get("cross_attn_weight_image", 0.1),
        cross_attn_norm_match=config.get("cross_attn_norm_match", True),
        cross_attn_init=config.get("cross_attn_init", "gated"),
        text_context_normalize=config.get("text_context_normalize", True),
        text_context_key_mask=config.get("text_context_key_mask", False),
        cross_attn_at_test=config.get("cross_attn_at_test", "image"),
        **aaclip_settings(config),
    )
    return model.to(device)


def load_cross_attention_stage(
    model: AdaptedCLIPWithCrossAttention, path: Path, stage: str, config: dict
) -> dict:
    """Load a fine-tuned stage (`text` or `image`): the adapter and its cross-attention module
    (+ gate) from our checkpoint or the fork's. Strict; a mismatch names the setting."""
    payload = load_adapter(model, path, f"{stage}_adapter", config)
    check_config(path, payload.get("config"), config, CROSS_ATTN_KEYS)
    key = f"{stage}_cross_attn"
    if key not in payload:
        raise CheckpointError(f"{path} holds no '{key}' weights; is it a base AA-CLIP checkpoint?")
    module = model.text_cross_attn if stage == "text" else model.image_cross_attn
    try:
        module.load_state_dict(payload[key])
    except RuntimeError as error:
        msg = f"{path} has {key} weights of another size; check --cross_attn_heads/--model_name"
        raise CheckpointError(msg) from error
    gate = model.text_cross_attn_gate if stage == "text" else model.image_cross_attn_gate
    saved_gate = payload.get(f"{key}_gate")
    if (gate is None) != (saved_gate is None):
        init = "xavier" if saved_gate is None else "gated"
        raise CheckpointError(
            f"{path} was trained with cross_attn_init={init}; pass --cross_attn_init {init}"
        )
    if gate is not None:
        gate.data.copy_(saved_gate)
    return payload


def from_checkpoint(
    path: Path, device: torch.device | str = "cpu", overrides: dict | None = None
) -> tuple[AdaptedCLIPWithCrossAttention, dict]:
    """The fine-tuned model from `image_adapter_cross_attn*.pth` and the
    `text_adapter_cross_attn.pth` beside it, rebuilt from the stored config (the fork's files
    carry none: pass the backbone settings as `overrides`). Returns (model in eval, payload)."""
    path = Path(path)
    payload = load_checkpoint(path)
    config = {**(payload.get("config") or {}), **(overrides or {})}
    if "model_name" not in config:
        msg = f"{path} has no stored config (fork format); pass the backbone flags used to train it"
        raise CheckpointError(msg)
    config["model"] = MODEL_NAME
    model = build_cross_attention(config, device)
    text_path = path.parent / "text_adapter_cross_attn.pth"
    if text_path.is_file():
        load_cross_attention_stage(model, text_path, "text", config)
    else:
        logger.warning("no %s: text anchors come from plain CLIP (no stage 1)", text_path)
        model.use_text_adapter = False
    load_cross_attention_stage(model, path, "image", config)
    return model.eval(), payload
