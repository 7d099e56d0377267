"""Where a model comes from, and the one place that opens it: a checkpoint in torch, or an
exported graph in onnxruntime or OpenVINO (`open_predictor`).

Every command that scores images (test.py, predict.py calibrate, score and export) composes the
`ModelSource` settings and calls `open_predictor`; no other code chooses between torch and a
graph. What a source says by default about the images it scores (their domain and the class it
was trained on) is resolved here too, with a log line saying where each came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from datasets.catalog import CATALOG, DEFAULT_DOMAIN, folder_info, real_name
from datasets.preprocessing import Preprocessing
from models.base import FrozenCLIPModel
from models.registry import MODELS, find_checkpoint, load_trained_model
from utils.core.checkpoint import file_sha256
from utils.core.config import RUN, TEST, setting, settings_of, to_mapping
from utils.core.errors import ConfigError, UserError
from utils.inference.graph import BACKENDS, INFO_FILE, ExportedPredictor
from utils.inference.predictor import AnomalyPredictor, Predictor

logger = logging.getLogger(__name__)

# Original-code files store no backbone: outside a catalogued data set they default to the
# paper's (ViT-L-14-336), as a Folder run's would.
FIELD_DATASET = "Folder"


@dataclasses.dataclass
class ModelSource:
    """The model a command scores with: a checkpoint, or an export's graph."""

    checkpoint: Path | None = setting(
        None,
        "the model: a checkpoint file or a training run folder; with --backend onnxruntime or "
        "openvino, a `predict.py export` folder",
        kind=RUN,
    )
    model: str | None = setting(
        None,
        "which model's checkpoint a run folder holds (default: the one found there)",
        kind=RUN,
        choices=tuple(MODELS),
    )
    backend: str = setting(
        "torch",
        "torch: the checkpoint; onnxruntime, openvino: the export's graph, with exactly its "
        "preprocessing, classes, domain and k-shot memory",
        kind=RUN,
        choices=BACKENDS,
    )
    skip_hash_check: bool = setting(
        False,
        "open an export whose graph files differ from the SHA-256 its model.json records (for a "
        "graph edited on purpose; a warning is logged)",
        kind=RUN,
        command_line_only=True,
    )

    @property
    def graph(self) -> bool:
        """Whether the source is an exported graph."""
        return self.backend != "torch"


@dataclasses.dataclass
class Opened:
    """An opened source: its predictor at the model input, and what produced it."""

    predictor: Predictor
    name: str  # the model's registry name
    file: Path  # the checkpoint file, or the export folder
    payload: dict[str, Any]  # the checkpoint's ({} for an export)
    provenance: dict[str, Any]  # model name, checkpoint path and SHA-256, epoch, config
    graph: dict[str, Any]  # {"backend": "torch"}, or the export's backend, export_id, precision
    model: FrozenCLIPModel | None = None  # the torch model (None for an export)

    def load(self, path: Path, trust: bool = False) -> None:
        """Another checkpoint file of the same run (`--all_epochs`): its weights in the model
        and a fresh predictor, which has cached no class text of the previous weights."""
        if self.model is None:
            raise ConfigError("an export is one graph: evaluate each export folder on its own")
        self.payload = self.model.load_trained(path, trust=trust)
        self.file = path
        self.provenance = _provenance(self.name, path, self.payload)
        old = self.predictor
        self.predictor = AnomalyPredictor(self.model, old.domain, old.amp, old.k_shot)

    def describe(self) -> dict[str, Any]:
        """What results files record of the source: the model, its file, epoch and settings
        (a checkpoint's test-time settings and weight sources; an export's backend, precision
        and identity)."""
        if self.model is None:
            info = self.predictor.info
            return {
                "model": self.name,
                "backend": self.graph["backend"],
                "export": str(self.file),
                "precision": self.graph["precision"],
                "export_id": self.graph["export_id"],
                "checkpoint": self.provenance["checkpoint"],
                "epoch": self.provenance.get("epoch"),
                "model_settings": self.provenance.get("config"),
                "support": info.get("support"),
            }
        settings = to_mapping(self.model.config)
        preprocessing = self.model.config.preprocessing_settings  # recorded under preprocessing
        return {
            "model": self.name,
            "checkpoint": str(self.file),
            "epoch": self.payload.get("epoch"),
            "train_seed": (self.payload.get("config") or {}).get("seed"),
            **self.model.weight_sources,
            **{
                field.name: settings[field.name]
                for field in settings_of(type(self.model.config), (TEST,))
                if field.name not in preprocessing
            },
            "model_settings": settings,
            "smoothing": self.model.smoothing,
        }


def flag_models(argv: list[str] | None, default: Path | None = None) -> list[str]:
    """The models a command's model-setting flags can be for, read from its `--checkpoint`
    (else `default`), `--model` and `--backend` before the full parse: the
    model the source holds (an export's model.json names it, a checkpoint's config), else every
    registered model. `--help` then lists only that model's settings, and another model's flag
    is refused as unknown."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--checkpoint", type=Path, default=default)
    pre.add_argument("--model", default=None)
    pre.add_argument("--backend", default="torch")
    known, _ = pre.parse_known_args(argv)  # unknown values: the full parse refuses them
    if known.model in MODELS:
        return [known.model]
    location = known.checkpoint
    try:
        if known.backend != "torch":
            info = json.loads((location / INFO_FILE).read_text())
            name = info["model"]["name"]
        else:
            name = find_checkpoint(location, None)[0]
    except (OSError, TypeError, KeyError, ValueError, UserError):
        return list(MODELS)  # no readable source yet: the command reports it once it runs
    return [name] if name in MODELS else list(MODELS)


def open_predictor(
    source: ModelSource,
    overrides: dict[str, Any],
    *,
    recorded_overrides: dict[str, Any] | None = None,
    path: Path | None = None,
    device: torch.device | None = None,
    domain: str | None = None,
    recorded_domain: str | None = None,
    domain_flag: str = "--domain",
    amp: str = "none",
    k_shot: int = 0,
    tiling: dict[str, Any] | None = None,
    dataset: str = FIELD_DATASET,
    trust: bool = False,
) -> Opened:
    """Open `source` (or `path`, one checkpoint file of it) as a predictor.

    `overrides`: the model settings given, which an export refuses (its model and
    preprocessing are fixed); a checkpoint applies `recorded_overrides` (a calibration's) under
    them. `domain`: the images' domain as given (by `domain_flag`: --domain, or test.py's
    --dataset); unset, a checkpoint scores in `recorded_domain` (a calibration's) or its
    training data set's, and an export in its own; where it came from is logged. `k_shot`: a
    checkpoint's support images per class; an export's memory is baked in, encoded at a tiling
    that must be `tiling` (the images' tiling, None for whole images), since support and test
    patches share a scale. `dataset`: what an original-code file's backbone defaults to.
    """
    location = path or source.checkpoint
    if location is None:
        raise ConfigError("pass --checkpoint: a checkpoint file, run folder or export folder")
    if source.graph:
        if overrides:
            raise ConfigError(
                f"an export's model and preprocessing are fixed; {sorted(overrides)} cannot "
                "change them: export again with those flags"
            )
        exported = ExportedPredictor(location, source.backend, source.skip_hash_check)
        if k_shot not in (0, exported.k_shot):
            raise ConfigError(
                f"--k_shot {k_shot}: the export's memory is {exported.k_shot}-shot, baked in at "
                f"export; leave --k_shot out, or export again with --k_shot {k_shot}"
            )
        if exported.k_shot and exported.support_tiling != tiling:
            encoded = tiling_flags(exported.support_tiling)
            raise ConfigError(
                f"the export's k-shot memory was encoded {encoded}, and support and test "
                f"patches must share a scale: score {encoded}, or export again "
                f"{tiling_flags(tiling)}"
            )
        wanted = domain or recorded_domain
        if wanted is not None and wanted != exported.domain:
            raise ConfigError(
                f"the export holds domain={exported.domain!r}, not {wanted!r}; export again "
                f"with --domain {wanted} or score with its own"
            )
        logger.info("domain %r: the export's (fixed at export)", exported.domain)
        _log_preprocessing(exported.preprocessing, "the export's (fixed at export)")
        info = exported.info
        graph = {"backend": source.backend, "export_id": info["export_id"]}
        graph["precision"] = info["precision"]
        return Opened(exported, exported.model_name, Path(location), {}, info["model"], graph)
    name, file = find_checkpoint(location, source.model, trust)
    overrides = {**(recorded_overrides or {}), **overrides}
    device = device or torch.device("cpu")
    _, model, payload = load_trained_model(file, device, name, overrides, dataset, trust)
    domain = field_domain(domain, payload, recorded_domain, domain_flag)
    predictor = AnomalyPredictor(model, domain, amp, k_shot)
    given = sorted(set(overrides) & set(model.config.preprocessing_settings))
    _log_preprocessing(
        predictor.preprocessing,
        f"--{', --'.join(given)} given, the rest the checkpoint's"
        if given
        else "the checkpoint's (--preprocess, --pad_color ... override)",
    )
    provenance = _provenance(name, file, payload)
    return Opened(predictor, name, file, payload, provenance, {"backend": "torch"}, model)


def _log_preprocessing(preprocessing: Preprocessing, source: str) -> None:
    logger.info(
        "preprocessing %s (%s) at %d px, pad colour %s: %s",
        preprocessing.geometry,
        preprocessing.backend,
        preprocessing.size,
        list(preprocessing.pad_color),
        source,
    )


def _provenance(name: str, file: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """What produced a calibration or an export: the model, its checkpoint file and hash."""
    return {
        "name": name,
        "checkpoint": str(file.resolve()),
        "checkpoint_sha256": file_sha256(file),
        "epoch": payload.get("epoch"),
        "config": payload.get("config"),
    }


def tiling_flags(tiling: dict[str, Any] | None) -> str:
    """How a tiling (`TileConfig.tiling()`) is asked for on the command line, as a phrase."""
    if tiling is None:
        return "on whole images (no --tile)"
    return (
        f"with --tile {tiling['tile']} --tile_overlap {tiling['overlap']:g} "
        f"--tile_scale {tiling['scale']:g}"
    )


def training_domain(payload: dict[str, Any]) -> str:
    """The domain of the data set a checkpoint was trained on (Industrial when unknown)."""
    dataset = (payload.get("config") or {}).get("dataset")
    return CATALOG[dataset].domain if dataset in CATALOG else DEFAULT_DOMAIN


def _resolved(
    what: str, given: str | None, recorded: str | None, fallback: str, source: str, flag: str
) -> str:
    """A command's `what` (domain, class): `given` (by `flag`), else a calibration's
    (`recorded`), else `fallback` from `source`; logs which, and how to override it."""
    if given:
        logger.info("%s %r (%s)", what, given, flag)
        return given
    if recorded:
        logger.info("%s %r: the calibration's (%s overrides)", what, recorded, flag)
        return recorded
    logger.info("%s %r: %s (%s overrides)", what, fallback, source, flag)
    return fallback


def field_domain(
    domain: str | None,
    payload: dict[str, Any],
    recorded: str | None = None,
    flag: str = "--domain",
) -> str:
    """The domain a command scores in: `domain` (given by `flag`: --domain, or test.py's
    --dataset), else the calibration's, else the training data set's; logs where it came from."""
    dataset = (payload.get("config") or {}).get("dataset")
    source = f"the training data set's ({dataset})"
    return _resolved("domain", domain, recorded, training_domain(payload), source, flag)


def trained_class(payload: dict[str, Any]) -> tuple[str | None, str]:
    """(the prompt name a checkpoint's run trained one class under, or None; what the run
    trained on): a Folder run's `--class_name`, or a data set of one class."""
    run = payload.get("config") or {}
    dataset = run.get("dataset")
    if dataset == "Folder":
        name = run.get("class_name") or "object"
        return real_name(folder_info(name), name), f"its Folder run's --class_name {name}"
    if dataset in CATALOG:
        info = CATALOG[dataset]
        if len(info.classes) == 1:
            return real_name(info, info.classes[0]), f"its {dataset} run"
        return None, f"its run trained on the {len(info.classes)} classes of {dataset}"
    return None, "its run names no data set"


def field_class(class_name: str | None, opened: Opened, recorded: str | None = None) -> str:
    """The class (prompt name) a field command scores: --class_name, else the calibration's
    (`recorded`), else the class the checkpoint's run trained (an export's first class), else
    the generic 'object'; logs where it came from."""
    if opened.model is None:
        trained, source = opened.predictor.classes[0]["prompt"], "the export's first class"
    else:
        trained, source = trained_class(opened.payload)
    flag = "--class_name"
    if trained is None:
        generic = f"the generic prompt ({source})"
        return _resolved("class", class_name, recorded, "object", generic, flag)
    return _resolved("class", class_name, recorded, trained, f"the checkpoint's, {source}", flag)
