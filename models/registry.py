"""The models by name (segment-anything's `sam_model_registry`), and finding a trained one.

Checkpoints say which model they hold in `config["model"]`; each model class rebuilds itself
from a checkpoint file alone (`FrozenCLIPModel.from_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.aaclip import AAClip
from models.aaclip_cross_attn import AAClipCrossAttn
from models.base import ClipConfig, FrozenCLIPModel
from models.feclip import FEClip
from models.sowa import SOWA
from utils.core.checkpoint import load_checkpoint
from utils.core.errors import CheckpointError, ConfigError
from utils.core.names import did_you_mean

# A model is registered by its class here (one import above): its config's `name` is its key,
# and models/<name>.py, configs/<name>.yaml and its class (the name without underscores, any
# case) share that stem. The order decides which model a folder holds when several files are
# present (a cross-attention run also keeps AA-CLIP names) and which original format is asked
# first.
REGISTERED: tuple[type[FrozenCLIPModel], ...] = (AAClipCrossAttn, AAClip, FEClip, SOWA)
MODELS: dict[str, type[FrozenCLIPModel]] = {model.config_class.name: model for model in REGISTERED}


def model_class(name: str) -> type[FrozenCLIPModel]:
    """The model class registered as `name`."""
    if name not in MODELS:
        hint = did_you_mean(name, MODELS)
        raise ConfigError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}{hint}")
    return MODELS[name]


def config_classes() -> list[type[ClipConfig]]:
    """Every model's config class, registry order."""
    return [model.config_class for model in MODELS.values()]


def checkpoint_stem(model: str) -> str:
    """The file stem of a model's checkpoints: `image_adapter` -> `image_adapter_<epoch>.pth`."""
    return Path(MODELS[model].checkpoint_file).stem


def find_checkpoint(path: Path, model: str | None = None, trust: bool = False) -> tuple[str, Path]:
    """(model name, checkpoint file) for a file, or for a save path holding one model's files:
    its kept epoch `<stem>_best.pth` when the run kept its lowest-loss epoch, else `<stem>.pth`."""
    path = Path(path)
    if path.is_file():
        return model or model_of(path, trust=trust), path
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a checkpoint file nor a folder; train first")
    names = [model] if model is not None else list(MODELS)
    for name in names:
        main = path / MODELS[name].checkpoint_file
        kept = main.with_name(f"{main.stem}_best{main.suffix}")
        for candidate in (kept, main):
            if candidate.is_file():
                return name, candidate
    expected = ", ".join(MODELS[name].checkpoint_file for name in names)
    raise CheckpointError(f"{path} holds no {expected}; train first or pass the file")


def model_of(path: Path, payload: dict | None = None, trust: bool = False) -> str:
    """The model a checkpoint file holds: its config's `model`; for a file of an original code,
    which stores none, the first model (registry order) that recognises its layout."""
    payload = load_checkpoint(path, trust=trust) if payload is None else payload
    saved = payload.get("config")
    if saved:
        name = saved.get("model", "aaclip")  # this project's first files named no model
        if name not in MODELS:
            known = list(MODELS)
            raise CheckpointError(f"{path} holds a {name!r} model; this version knows {known}")
        return name
    for name, model in MODELS.items():
        if model.is_original(payload):
            return name
    raise CheckpointError(
        f"{path} is neither a checkpoint of this project nor a file of an original code "
        f"({', '.join(MODELS)}); its keys are {sorted(payload)[:8]}"
    )


def load_trained_model(
    path: Path,
    device: torch.device | str = "cpu",
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
    dataset: str = "Synthetic",
    trust: bool = False,
) -> tuple[str, FrozenCLIPModel, dict]:
    """(model name, model in eval mode, checkpoint payload) from a checkpoint file or save path.

    `overrides` change test-time settings (an architectural one must equal the checkpoint's);
    for a file of the original code, which stores no config, they describe its architecture and
    `dataset` picks the default backbone. `trust`: files that need pickle may be read.
    """
    name, file = find_checkpoint(path, model, trust)
    trained, payload = MODELS[name].from_checkpoint(file, device, overrides, dataset, trust)
    return name, trained, payload
