"""Find and rebuild any trained model from its checkpoint (test.py and predict.py).

Every model module offers `from_checkpoint(path, device, overrides) -> (model, payload)`; the
model answers `predict(images, class_names) -> (anomaly_map [B, S, S], image_score [B])` with
prompt names such as "metal nut", and `table_image_scores(maps, scores, domain)` for the paper
protocol. Checkpoints say which model they hold in `config["model"]`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError

# Model name -> (module, main checkpoint file in a save path). The order decides which model a
# folder holds when several files are present (a cross-attention run also keeps AA-CLIP names).
MODELS: dict[str, tuple[str, str]] = {
    "aaclip_cross_attn": ("models.cross_attention", "image_adapter_cross_attn.pth"),
    "aaclip": ("models.aaclip", "image_adapter.pth"),
    "feclip": ("models.feclip", "feclip.pth"),
    "sowa": ("models.sowa", "sowa.pth"),
}


def checkpoint_stem(model: str) -> str:
    """The file stem of a model's checkpoints: `image_adapter` -> `image_adapter_<epoch>.pth`."""
    return Path(MODELS[model][1]).stem


def find_checkpoint(path: Path, model: str | None = None) -> tuple[str, Path]:
    """(model name, checkpoint file) for a file, or for a save path holding one model's files."""
    path = Path(path)
    if path.is_file():
        return model or model_of(path), path
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a checkpoint file nor a folder; train first")
    names = [model] if model is not None else list(MODELS)
    for name in names:
        candidate = path / MODELS[name][1]
        if candidate.is_file():
            return name, candidate
    expected = ", ".join(MODELS[name][1] for name in names)
    raise CheckpointError(f"{path} holds no {expected}; train first or pass the file")


def model_of(path: Path, payload: dict | None = None) -> str:
    """The model a checkpoint file holds: its config's `model`; for files without one, the
    cross-attention fork's when it holds cross-attention weights, else the original AA-CLIP's."""
    payload = load_checkpoint(path) if payload is None else payload
    fork = "image_cross_attn" in payload or "text_cross_attn" in payload
    name = (payload.get("config") or {}).get("model", "aaclip_cross_attn" if fork else "aaclip")
    if name not in MODELS:
        raise CheckpointError(f"{path} holds a {name!r} model; this version knows {list(MODELS)}")
    return name


def load_trained_model(
    path: Path,
    device: torch.device | str = "cpu",
    model: str | None = None,
    overrides: dict | None = None,
) -> tuple[str, nn.Module, dict]:
    """(model name, model in eval mode, checkpoint payload) from a checkpoint file or save path."""
    name, file = find_checkpoint(path, model)
    module = importlib.import_module(MODELS[name][0])
    trained, payload = module.from_checkpoint(file, device, overrides)
    return name, trained, payload
