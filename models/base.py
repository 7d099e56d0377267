"""What every model shares: the backbone settings, the output type, training stages and the
frozen-CLIP base class with one inference verb and one training interface.

A model answers `predict(images, class_names, valid_mask=None) -> AnomalyOutput`. The keyword
arguments after it (`text`, `memory`, `domain`) are the state a predictor
(`utils.inference.predictor.AnomalyPredictor`) owns and hands in: cached class texts, a k-shot
memory, the test domain. Training goes through `utils.engine.training.fit`, which asks the model
for its `stages()`, each stage's optimizer (`configure_optimizer`), forward (`forward_train`),
`loss(output, batch)` and checkpoint entries.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from open_clip.model import CLIP
from torch import nn

from datasets.catalog import DEFAULT_DOMAIN, DatasetInfo
from datasets.preprocessing import (
    BACKENDS,
    DEFAULT_PAD_COLOR,
    GEOMETRIES,
    MASK_RESIZES,
    Preprocessing,
)
from models import backbone
from utils.core.checkpoint import load_checkpoint
from utils.core.config import ARCH, TEST, check_architecture, from_mapping, override, setting
from utils.core.errors import CheckpointError, ConfigError, DataError

logger = logging.getLogger(__name__)

PAPER_MODEL = "ViT-L-14-336"
TINY_IMG_SIZE = 64


@dataclasses.dataclass
class ClipConfig:
    """The frozen CLIP every model adapts, and the input pipeline in front of it."""

    name: ClassVar[str] = ""
    paper_img_size: ClassVar[int] = 518
    # The settings `preprocessing()` turns into a Preprocessing: records keep them there, once.
    preprocessing_settings: ClassVar[tuple[str, ...]] = (
        "img_size",
        "preprocess",
        "resize_backend",
        "pad_color",
        "mask_resize",
        "train_mask_threshold",
        "test_mask_threshold",
    )
    # Defaults of the run settings (utils.engine.training.RunConfig) that differ for this model.
    run_defaults: ClassVar[dict[str, Any]] = {}
    # A fine-tuning model's base checkpoints (the names of its path settings) and the config
    # class whose settings, with the run's, it inherits from them when not given.
    base_checkpoints: ClassVar[tuple[str, ...]] = ()
    inherits: ClassVar[type | None] = None

    model_name: str | None = setting(
        None,
        "'tiny' (random test backbone) or an open_clip model; unset: tiny for --dataset "
        "Synthetic, else ViT-L-14-336",
        kind=ARCH,
    )
    pretrained: str | None = setting(
        "openai",
        "open_clip weight tag or a local weights file such as ViT-L-14-336px.pt (unused for tiny)",
        kind=TEST,
    )
    quick_gelu: bool = setting(
        False, "QuickGELU, as OpenAI trained CLIP (the released AA-CLIP runs exact GELU)", kind=ARCH
    )
    img_size: int | None = setting(
        None, "input side in pixels; unset: 64 for tiny, else the paper's", kind=ARCH, minimum=1
    )
    preprocess: str = setting(
        "square",
        "image geometry: square (bicubic S x S, aspect not kept: AA-CLIP, SOWA), "
        "short_side_crop (short side to S, centre crop: the FE-CLIP fork's) or letterbox "
        "(aspect kept, padded with --pad_color; the padding is never scored)",
        kind=TEST,
        choices=GEOMETRIES,
    )
    resize_backend: str = setting(
        "pil",
        "resize the 8-bit PIL image (pil: AA-CLIP's and SOWA's transforms) or the image as a "
        "float tensor (torch: the FE-CLIP fork's torchvision pipeline; its nearest mask resize "
        "floors, PIL's samples pixel centres)",
        kind=TEST,
        choices=BACKENDS,
    )
    pad_color: list[int] = setting(
        list(DEFAULT_PAD_COLOR),
        "letterbox pad colour, also under transparent pixels (0-255 each)",
        kind=TEST,
        nargs=3,
        minimum=0,
        maximum=255,
        metavar=("R", "G", "B"),
    )
    mask_resize: str = setting(
        "nearest",
        "mask interpolation: nearest (AA-CLIP) or bilinear (SOWA, grey edges)",
        kind=TEST,
        choices=MASK_RESIZES,
    )
    train_mask_threshold: float = setting(
        0.0, "training masks: defect where the resized mask (0-1) is above this", minimum=0
    )
    test_mask_threshold: float = setting(
        0.0,
        "test ground truth: defect where the resized mask (0-1) is above this (SOWA: 0.5)",
        kind=TEST,
        minimum=0,
    )
    # Each model reads the outputs of some vision blocks; its config gives its own default and
    # the original's name for them (`redefault`), `FrozenCLIPModel` checks them.
    block_indices: list[int] = setting(
        [5, 11, 17, 23],
        "0-based vision blocks whose outputs the model reads",
        kind=ARCH,
        minimum=0,
    )

    def resolve(self, dataset: str) -> ClipConfig:
        """Fill `model_name`/`img_size` left unset: tiny at 64 px for Synthetic, the paper's
        ViT-L-14-336 at `paper_img_size` (AA-CLIP 518, FE-CLIP and SOWA 336) otherwise."""
        model_name = self.model_name or ("tiny" if dataset == "Synthetic" else PAPER_MODEL)
        tiny = model_name == backbone.TINY
        paper = TINY_IMG_SIZE if tiny else self.paper_img_size
        return dataclasses.replace(
            self,
            model_name=model_name,
            img_size=self.img_size or paper,
            pretrained=None if tiny else self.pretrained,  # random weights: records say so
        )

    def check(self) -> None:
        """Settings that depend on each other, beyond each field's own range (a one-line
        ConfigError naming the flag)."""

    def preprocessing(
        self, train: bool, resize_masks: bool = False, size: int | None = None
    ) -> Preprocessing:
        """How images and masks become this model's inputs, in training or at test (with
        `resize_masks`, a mask of another size than its image is resized, not refused), at
        `size` (default `img_size`)."""
        return Preprocessing(
            size=size or self.img_size,
            geometry=self.preprocess,
            backend=self.resize_backend,
            pad_color=tuple(self.pad_color),
            mask_resize=self.mask_resize,
            mask_threshold=self.train_mask_threshold if train else self.test_mask_threshold,
            resize_masks=resize_masks,
        )

    def load_clip(self, device: torch.device | str = "cpu") -> CLIP:
        """The frozen CLIP these settings name."""
        return backbone.load_clip(
            self.model_name,
            pretrained=self.pretrained,
            img_size=self.img_size,
            quick_gelu=self.quick_gelu,
            device=device,
        )


@dataclasses.dataclass
class SingleStageConfig(ClipConfig):
    """A model trained in one stage (FE-CLIP, SOWA): its length and batch."""

    epochs: int = setting(1, "epochs", minimum=0)
    batch_size: int = setting(8, "global batch size (split over torchrun ranks)", minimum=1)
    keep_epoch: str = setting(
        "last",
        "the epoch test.py and predict.py read from a save path: last, or lowest_loss (the "
        "lowest mean training loss, <stem>_best.pth)",
        choices=("last", "lowest_loss"),
    )


class AnomalyOutput(NamedTuple):
    """What every model's `predict` returns; unpacks as a pair."""

    anomaly_map: torch.Tensor  # [B, S, S] float32
    image_score: torch.Tensor  # [B] float32


class MapExtrema(NamedTuple):
    """Each map's minimum and maximum: all a paper protocol's image score needs of the maps."""

    minima: np.ndarray  # [N]
    maxima: np.ndarray  # [N]

    @classmethod
    def of(cls, maps: np.ndarray) -> MapExtrema:
        """maps `[N, H, W]` -> each map's (minimum, maximum), in the maps' dtype."""
        flat = np.asarray(maps).reshape(len(maps), -1)
        return cls(flat.min(axis=1), flat.max(axis=1))

    @classmethod
    def concatenate(cls, parts: list[MapExtrema]) -> MapExtrema:
        """The extrema of several batches, in order (`[0]` each for none)."""
        if not parts:
            return cls(np.empty(0, np.float32), np.empty(0, np.float32))
        return cls(*(np.concatenate(values) for values in zip(*parts, strict=True)))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: what trains, how long, in which batches, saved under which keys."""

    name: str  # "text", "image" (AA-CLIP's two stages), "train" (single-stage models)
    stem: str  # checkpoint stem: <stem>.pth is the resume point
    epochs: int
    batch_size: int
    color_jitter: bool = True  # the training set's colour jitter (AA-CLIP stage 1: off)
    per_epoch_files: bool = True  # also <stem>_<epoch>.pth
    optimizer_key: str = "optimizer"
    scheduler_key: str = "scheduler"
    scheduler_interval: str = "step"  # "step", or "epoch" (stepped with the epoch's mean loss)
    title: str = ""  # the original's name of the stage's training (train_text_adapter, ...)
    log_prefix: str = ""  # "text " logs "text epoch 1/5: loss ..."
    lr_flag: str = "--lr"  # the flag of this stage's learning rate (named in divergence errors)
    keep: str = "last"  # "lowest_loss" also keeps the lowest-training-loss epoch as <stem>_best
    # Whether the stage has an image-level loss, so images without masks teach it (from their
    # label); without one, `image_loss_flag` names the setting that adds the paper's term.
    image_loss: bool = True
    image_loss_flag: str = ""


def stack_texts(texts: list[Any]) -> Any:
    """Per-image class texts (each a tensor, or a NamedTuple of tensors) -> one batch of the same
    structure whose tensors are stacked: `[B, ...]`."""
    first = texts[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(texts)
    return type(first)(*(torch.stack(parts) for parts in zip(*texts, strict=True)))


def select_texts(texts: Any, index: torch.Tensor) -> Any:
    """Rows `index` `[B]` of stacked texts (`stack_texts`' structure): per image its class's."""
    if isinstance(texts, torch.Tensor):
        return texts[index]
    return type(texts)(*(part[index] for part in texts))


def rename_original(state: dict[str, Any], rules: tuple, keep: set[str]) -> dict[str, Any]:
    """An original state dict in our names: the first matching `(pattern, replacement)` rule,
    keeping only keys in `keep` (the frozen CLIP and buffers we rebuild are left out)."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if pattern.match(key):
                new = pattern.sub(replacement, key, count=1)
                if new in keep:
                    renamed[new] = value
                break
    return renamed


class FrozenCLIPModel(nn.Module):
    """A frozen, eval-mode open_clip CLIP plus trainable modules (subclasses add them).

    Subclasses set `config_class` and `checkpoint_file` and implement the inference verbs
    (`class_text`, `predict`) and the training interface (`stages`, `trainable_parameters`,
    `configure_optimizer`, `forward_train`, `loss`, `stage_state`, `load_stage_state`).
    """

    config_class: ClassVar[type[ClipConfig]] = ClipConfig
    checkpoint_file: ClassVar[str] = ""  # the main file in a save path, e.g. image_adapter.pth
    # The original code's choices where they differ from ours, for its files (which store none).
    original_defaults: ClassVar[dict[str, Any]] = {}
    log_file: ClassVar[str] = "train.log"
    supports_memory: ClassVar[bool] = False  # k-shot support memory at test (SOWA)

    def __init__(self, config: ClipConfig, clip: CLIP | None = None) -> None:
        super().__init__()
        self.config = config
        self.clipmodel = backbone.freeze(clip if clip is not None else config.load_clip())
        self._check_block_indices()

    def _check_block_indices(self) -> None:
        """`block_indices` must be increasing 0-based indices of this backbone's vision blocks;
        the message names the flag, and the original's flag in its own counting."""
        indices = self.config.block_indices
        blocks = backbone.num_vision_blocks(self.clipmodel)
        if indices and sorted(set(indices)) == indices and indices[0] >= 0 and indices[-1] < blocks:
            return
        field = next(f for f in dataclasses.fields(self.config) if f.name == "block_indices")
        original = field.metadata["original"]
        shown = ""
        if original:
            offset = field.metadata["aliases"][original]
            shown = f" (--{original} {' '.join(str(index + offset) for index in indices)})"
        raise ConfigError(
            f"--block_indices {indices}{shown} must be increasing 0-based indices of the "
            f"backbone's {blocks} vision blocks (< {blocks})"
        )

    @classmethod
    def from_config(cls, config: ClipConfig, device: torch.device | str = "cpu") -> FrozenCLIPModel:
        """The model with its CLIP loaded straight onto `device`, trainable modules moved there."""
        return cls(config, config.load_clip(device)).to(device)

    @property
    def name(self) -> str:
        return self.config_class.name

    # ---------------------------------------------------------------------------------------
    # Modes: CLIP is frozen and stays in eval mode; only the trainable modules follow train().

    def train(self, mode: bool = True) -> FrozenCLIPModel:
        super().train(mode)
        self.clipmodel.eval()
        return self

    @property
    def img_size(self) -> int:
        return backbone.image_size(self.clipmodel)

    @property
    def device(self) -> torch.device:
        return self.clipmodel.visual.proj.device

    def preprocessing(self, train: bool = False, resize_masks: bool = False) -> Preprocessing:
        """The one preprocessing of this model's inputs (its config's, at its backbone's size),
        for training (`train`: the training mask threshold) or every inference path."""
        return self.config.preprocessing(train, resize_masks, size=self.img_size)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight that is not CLIP's."""
        return {
            key: value
            for key, value in self.state_dict().items()
            if not key.startswith("clipmodel.")
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load `trainable_state_dict` output; missing, unexpected or mis-shaped keys raise
        RuntimeError."""
        result = self.load_state_dict(state, strict=False)
        missing = [key for key in result.missing_keys if not key.startswith("clipmodel.")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing keys {missing}, unexpected keys {result.unexpected_keys}")

    # ---------------------------------------------------------------------------------------
    # Inference

    @property
    def smoothing(self) -> str:
        """How test-time maps are smoothed (recorded with the results)."""
        raise NotImplementedError

    def class_text(self, prompt_name: str) -> Any:
        """What `predict` needs of one class's text, computed once per class by a predictor."""
        raise NotImplementedError

    def class_texts(self, class_names: list[str], text: dict[str, Any] | None) -> list[Any]:
        """Per image, its class's text: from `text` (a predictor's cache) or computed now."""
        text = dict(text or {})
        for name in dict.fromkeys(class_names):
            if name not in text:
                text[name] = self.class_text(name)
        return [text[name] for name in class_names]

    def encode_memory(self, support_images: torch.Tensor) -> Any:
        """A k-shot memory from `[k, 3, S, S]` normal images (models with `supports_memory`)."""
        raise NotImplementedError(f"{self.name} has no k-shot memory")

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        valid_mask: torch.Tensor | None = None,
        *,
        text: dict[str, Any] | None = None,
        memory: Any = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> AnomalyOutput:
        """Raw test-time outputs (no test-set normalisation).

        images `[B, 3, S, S]`, one prompt name per image; valid_mask `[B, S, S]` bool (False on
        letterbox padding) or None; `text` cached `class_text` results by prompt name; `memory`
        an `encode_memory` result; `domain` the test data's ("Industrial" | "Medical").
        -> anomaly map `[B, S, S]`, image score `[B]`, float32.
        """
        batch, _, height, width = images.shape
        if len(class_names) != batch:
            raise DataError(f"{len(class_names)} class names for {batch} images; pass one each")
        if valid_mask is not None:
            if tuple(valid_mask.shape) != (batch, height, width):
                expected = (batch, height, width)
                msg = f"valid_mask has shape {tuple(valid_mask.shape)}; expected {expected}"
                raise DataError(msg)
            valid_mask = valid_mask.to(images.device).bool()
        texts = stack_texts(self.class_texts(class_names, text))
        return self._predict(images, class_names, texts, valid_mask, memory, domain)

    def _predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        texts: Any,
        valid_mask: torch.Tensor | None,
        memory: Any,
        domain: str,
    ) -> AnomalyOutput:
        """`predict` on checked inputs: `texts` is each image's class text, stacked
        (`stack_texts`: tensors `[B, ...]`, or `[1, ...]` for one class text of all, as an
        exported graph passes them); `memory` an `encode_memory` result, or such memories
        stacked per image (`[B, ...]`, an export's)."""
        raise NotImplementedError

    @classmethod
    def table_image_scores(
        cls, extrema: MapExtrema, scores: np.ndarray, domain: str, few_shot: bool
    ) -> np.ndarray:
        """Paper-table image scores of one class from the extrema of `predict`'s maps (each
        `[N]`) and its scores `[N]` (each model's paper protocol; may be transductive, so
        test.py only)."""
        return np.asarray(scores, dtype=np.float64)

    # ---------------------------------------------------------------------------------------
    # Training

    def stages(self) -> list[Stage]:
        """The training stages, in order."""
        raise NotImplementedError

    def trainable_parameters(self, stage: Stage) -> list[dict[str, Any]]:
        """Optimizer parameter groups of a stage; sets `requires_grad` on exactly them."""
        raise NotImplementedError

    def configure_optimizer(
        self, stage: Stage
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The stage's optimizer and LR scheduler (None: constant)."""
        raise NotImplementedError

    def prepare_training(self, trust: bool = False) -> None:
        """Work before the first stage, e.g. the cross-attention variant loads its base adapters
        (`trust`: files that need pickle may be read)."""

    def start_optimizer(self, stage: Stage, optimizer: torch.optim.Optimizer) -> None:
        """Seed a stage's new optimizer before a resume may load its own state (none here)."""

    def prepare_stage(self, stage: Stage, dataset: str | DatasetInfo) -> None:
        """Work before a stage starts (e.g. anchors frozen for stage 2); the training data set's
        catalog name gives the classes' prompt names."""

    def skip_stage(self, stage: Stage) -> bool:
        """A stage with no epochs and no checkpoint: adjust the model; True writes the stage's
        current weights as epoch 0 (they came from elsewhere and test time needs them)."""
        return False

    def forward_train(self, batch: dict[str, Any], stage: Stage) -> Any:
        """The stage's forward on a batch (`image`, `mask`, `label`, `class_name`), autocast."""
        raise NotImplementedError

    def loss(self, output: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Float32 loss terms of a `forward_train` output: `loss` (the total) first, then the
        terms worth logging."""
        raise NotImplementedError

    def stage_state(self, stage: Stage) -> dict[str, Any]:
        """The stage's weights as checkpoint entries (the originals' keys)."""
        return {self.name: self.trainable_state_dict()}

    def load_stage_state(self, stage: Stage, payload: dict[str, Any], path: Path) -> None:
        """Load a stage checkpoint's weights, strictly, after checking its architecture."""
        self.check_checkpoint(path, payload)
        if self.name not in payload:
            raise CheckpointError(f"{path} holds no {self.name} weights (keys: {sorted(payload)})")
        try:
            self.load_trainable_state_dict(payload[self.name])
        except RuntimeError as error:
            msg = f"{path} has {self.name} weights of another shape; check --model_name"
            raise CheckpointError(msg) from error

    def check_checkpoint(
        self, path: Path, payload: dict[str, Any], config_class: type | None = None
    ) -> None:
        """Refuse a checkpoint of another model or architecture (its stored config against
        this model's, as `config_class`, default this model's own); files without a config
        (the original code's) pass and are checked by their weights."""
        config_class = config_class or self.config_class
        saved = payload.get("config")
        if not saved:
            return
        model = saved.get("model", "aaclip")
        if model != config_class.name:
            raise CheckpointError(
                f"{path} was trained with model={model!r} but this run has "
                f"model={config_class.name!r}; pass its own save path or --model {model}"
            )
        stored = from_mapping(config_class, saved, f"{path}'s stored config")
        check_architecture(path, stored, self.config)

    # ---------------------------------------------------------------------------------------
    # Checkpoints for inference

    @classmethod
    def config_from_checkpoint(
        cls,
        path: Path,
        payload: dict[str, Any],
        overrides: dict[str, Any],
        dataset: str,
        trust: bool = False,
    ) -> ClipConfig:
        """The config that rebuilds a checkpoint's model: its stored config with the test-time
        `overrides`. A file of the original code stores none: its settings come from the flags
        given, else from the file itself (`original_settings`), else from the original's
        documented defaults (`original_defaults`), all logged. `trust`: companion files that
        need pickle may be read (`--trust_checkpoint`)."""
        saved = payload.get("config")
        if not saved:
            inferred = cls.original_settings(path, payload, trust)
            settings = {**cls.original_defaults, **inferred, **overrides}
            config = from_mapping(cls.config_class, settings, str(path)).resolve(dataset)
            logger.warning(
                "%s is a file of the original %s code: settings from the file %s, from its "
                "documented defaults %s, from the command line %s",
                path,
                cls.config_class.name,
                inferred,
                {key: value for key, value in cls.original_defaults.items() if key not in inferred},
                overrides,
            )
            return config
        model = saved.get("model", "aaclip")
        if model != cls.config_class.name:
            raise CheckpointError(
                f"{path} is not a {cls.config_class.name} checkpoint (model={model!r})"
            )
        stored = from_mapping(cls.config_class, saved, f"{path}'s stored config")
        return override(stored, overrides, path)

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        device: torch.device | str = "cpu",
        overrides: dict[str, Any] | None = None,
        dataset: str = "Synthetic",
        trust: bool = False,
    ) -> tuple[FrozenCLIPModel, dict[str, Any]]:
        """The trained model, rebuilt from a checkpoint file alone (`overrides`: test-time
        settings, or for an original file its architecture; `trust`: files that need pickle may
        be read). Returns (model in eval, payload)."""
        path = Path(path)
        payload = load_checkpoint(path, trust=trust)
        config = cls.config_from_checkpoint(path, payload, overrides or {}, dataset, trust)
        model = cls.from_config(config, device)
        return model, model.load_trained(path, payload, trust)

    @classmethod
    def is_original(cls, payload: dict[str, Any]) -> bool:
        """Whether a checkpoint without a stored config is a file of this model's original code
        (each model recognises its own original's layout)."""
        return False

    @classmethod
    def original_settings(
        cls, path: Path, payload: dict[str, Any], trust: bool = False
    ) -> dict[str, Any]:
        """Settings a file of the original code holds or its weights imply (none here)."""
        return {}

    def from_original(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A file of the original code in our payload layout (ours already: unchanged)."""
        return payload

    def nested_original(self, payload: dict[str, Any], wrapper: str, rules: tuple) -> dict:
        """`from_original` for originals that nest their weights under `wrapper`, renamed by
        `rules` (`rename_original`); a payload without it is ours, unchanged."""
        if wrapper not in payload:
            return payload
        state = rename_original(payload[wrapper], rules, set(self.trainable_state_dict()))
        return {"epoch": payload.get("epoch"), self.name: state}

    def load_trained(
        self, path: Path, payload: dict[str, Any] | None = None, trust: bool = False
    ) -> dict[str, Any]:
        """Load what `predict` needs from a trained checkpoint file (and its companions beside
        it) into this model; returns the file's payload. Leaves the model in eval mode."""
        payload = load_checkpoint(path, trust=trust) if payload is None else payload
        if not payload.get("config"):
            payload = self.from_original(payload)
        self.load_stage_state(self.stages()[-1], payload, Path(path))
        self.eval()
        return payload

    @property
    def weight_sources(self) -> dict[str, str]:
        """Which files the loaded weights came from (recorded with the results)."""
        return {}
