"""Exported graphs, read side: an export folder checked whole when opened, and its graph run
behind the predictor interface (`ExportedPredictor`) by onnxruntime or OpenVINO on the CPU.

An export folder (written by `utils.deploy.export`) holds the graph `image [B, 3, S, S]
(+ valid_mask [B, S, S] when letterboxed) (+ class_index [B] when it scores several classes) ->
anomaly_map [B, S, S], image_score [B]` and `model.json`: the exact preprocessing, the classes
(name and prompt), the domain, the k-shot support (and the tiling its memory was encoded at), the
precision, the SHA-256 of every file and what produced it. Opening a folder (`read_info`) checks
model.json whole, its file names (inside the folder), `export_id` against `files` and each file
against its SHA-256, before any image is read. onnxruntime and openvino are the optional
deployment extra (requirements-deploy.txt), imported only when a graph is run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.preprocessing import Preprocessing
from datasets.tiling import is_tiling
from models.base import AnomalyOutput, MapExtrema
from models.registry import model_class
from utils.core.checkpoint import file_sha256
from utils.core.errors import CheckpointError, ConfigError
from utils.core.runtime import cpu_kind, native_bf16
from utils.inference.predictor import InputPredictor

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
INFO_FILE = "model.json"
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
OUTPUTS = ("anomaly_map", "image_score")
WEIGHTS_FILE = "model.bin"  # OpenVINO's weights beside model.xml
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the rest in fp32
EXTRA_HINT = "pip install -r requirements-deploy.txt"


def require(module: str, purpose: str) -> Any:
    """Import an optional deployment module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the {module} package; {EXTRA_HINT}") from None


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} {what}; export it again with predict.py export")


def _inside(model_dir: Path, name: Any, key: str) -> Path:
    """`model_dir / name` for a file name model.json lists: relative, and inside the folder
    once symlinks are followed; otherwise a CheckpointError."""
    info = Path(model_dir) / INFO_FILE
    if (
        not isinstance(name, str)
        or not name
        or Path(name).is_absolute()
        or ".." in Path(name).parts
    ):
        raise _fail(info, f"lists {key} {name!r}: an export names files inside its folder only")
    path = Path(model_dir) / name
    if not path.resolve().is_relative_to(Path(model_dir).resolve()):
        raise _fail(info, f"lists {key} {name!r}, a link out of its folder {model_dir}")
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} lacks {name}, which its {INFO_FILE} lists; copy the whole export folder"
        )
    return path


INFO_TYPES = {
    "graphs": dict,
    "inputs": list,
    "files": dict,
    "export_id": str,
    "precision": str,
    "preprocessing": dict,
    "domain": str,
    "model": dict,
    "classes": list,
    "k_shot": int,
}


def _check_info(info: Any, model_dir: Path) -> None:
    """model.json's keys and types, and its graphs' and files' names (see `_inside`)."""
    path = Path(model_dir) / INFO_FILE
    if not isinstance(info, dict):
        raise _fail(path, f"holds a {type(info).__name__}, not an export's description")
    for key, kind in INFO_TYPES.items():
        value = info.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            shown = "no value" if key not in info else f"a {type(value).__name__}"
            raise _fail(path, f"has {shown} for {key}, not a {kind.__name__}")
    checks = {
        "precision": info["precision"] in PRECISIONS,
        "k_shot": info["k_shot"] >= 0,
        "model": isinstance(info["model"].get("name"), str)
        and isinstance(info["model"].get("checkpoint_sha256"), str),
        "classes": bool(info["classes"])
        and all(
            isinstance(entry, dict)
            and all(isinstance(entry.get(k), str) for k in ("name", "prompt"))
            for entry in info["classes"]
        ),
        "inputs": info["inputs"][:1] == ["image"]
        and set(info["inputs"]) <= {"image", "valid_mask", "class_index"},
        "graphs": bool(info["graphs"]) and set(info["graphs"]) <= set(FORMATS),
        "files": all(
            isinstance(digest, str) and len(digest) == 64 for digest in info["files"].values()
        ),
        "support": info.get("support") is None
        or (
            isinstance(info["support"], dict)
            and (info["support"].get("tiling") is None or is_tiling(info["support"]["tiling"]))
        ),
    }
    for key, valid in checks.items():
        if not valid:
            raise _fail(path, f"has a malformed {key} ({str(info.get(key))[:80]})")
    for fmt, name in info["graphs"].items():
        _inside(model_dir, name, f"graph {fmt}")
        needed = [name, *([str(Path(name).with_suffix(".bin"))] if fmt == "openvino" else [])]
        for file in needed:
            if file not in info["files"]:
                raise _fail(path, f"records no SHA-256 of {file}")
    for name in info["files"]:
        _inside(model_dir, name, "file")


def read_info(model_dir: Path, skip_hash_check: bool = False) -> dict[str, Any]:
    """The `model.json` of an export folder, checked: every key with its type, graph and file
    names inside the folder, `export_id` the hash of `files`, and each file's SHA-256 the one
    `files` records (unless `skip_hash_check`: a warning). Otherwise a one-line error."""
    model_dir = Path(model_dir)
    path = model_dir / INFO_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} holds no {INFO_FILE}; with --backend onnxruntime or openvino pass the "
            "folder `predict.py export --out` wrote"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _fail(path, f"cannot be read ({reason})") from None
    _check_info(info, model_dir)
    if info["export_id"] != export_id(info["files"]):
        raise _fail(path, "has an export_id that is not the hash of its files: it was edited")
    if skip_hash_check:
        logger.warning(
            "--skip_hash_check: the files of %s are not checked against %s", model_dir, INFO_FILE
        )
        return info
    for name, digest in info["files"].items():
        if file_sha256(model_dir / name) != digest:
            raise CheckpointError(
                f"{model_dir / name} is not the file {INFO_FILE} records (its SHA-256 differs): "
                "export again, or pass --skip_hash_check if you changed it on purpose"
            )
    return info


def export_id(files: dict[str, str]) -> str:
    """An export's identity: the SHA-256 of its files' names and hashes."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


class ExportedPredictor(InputPredictor):
    """An exported graph behind the predictor interface, on the CPU.

    backend: `onnxruntime` (fp32 graphs) or `openvino` (any precision); the classes, domain,
    k-shot memory (baked into the graph) and preprocessing are the export's.
    """

    amp = "none"  # graphs are float32 (bf16 and int8 inside OpenVINO)
    needs_support = False  # a k-shot export's memory is in the graph

    def __init__(self, model_dir: Path, backend: str, skip_hash_check: bool = False) -> None:
        self.info = read_info(model_dir, skip_hash_check)
        self.backend = backend
        self.preprocessing = Preprocessing.from_dict(
            self.info.get("preprocessing"), f"{Path(model_dir) / INFO_FILE}"
        )
        self.domain = self.info["domain"]
        self.model_name = self.info["model"]["name"]
        self.precision = self.info["precision"]
        self.k_shot = self.info["k_shot"]
        self.classes = self.info["classes"]  # [{"name", "prompt"}], the class_index order
        # the tiling the k-shot memory was encoded at (None: whole images, or zero-shot)
        self.support_tiling = (self.info.get("support") or {}).get("tiling")
        self._index = {}
        for index, entry in enumerate(self.classes):
            self._index[entry["name"]] = self._index[entry["prompt"]] = index
        graphs = self.info["graphs"]
        if backend == "onnxruntime":
            runtime = require("onnxruntime", "--backend onnxruntime")
            if "onnx" not in graphs:
                raise ConfigError(
                    f"{model_dir} holds no ONNX graph (a {self.precision} export is OpenVINO's); "
                    "use --backend openvino, or export again with --format onnx"
                )
            path = Path(model_dir) / graphs["onnx"]
            session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.inputs = [node.name for node in session.get_inputs()]
            side = [dim if isinstance(dim, int) else None for dim in session.get_inputs()[0].shape]
            self._run = lambda feed: session.run(list(OUTPUTS), feed)
        elif backend == "openvino":
            path = Path(model_dir) / graphs.get("openvino", graphs.get("onnx"))  # reads ONNX too
            if self.precision == "bf16" and not native_bf16(torch.device("cpu")):
                logger.warning(
                    "a bf16 export on a CPU without native bf16 (%s): OpenVINO runs it emulated",
                    cpu_kind(),
                )
            # f32 unless the export says otherwise: OpenVINO would infer in bf16 on CPUs that
            # have it, away from the precision the export was measured at
            openvino = require("openvino", "--backend openvino")
            hint = {"INFERENCE_PRECISION_HINT": OPENVINO_HINTS[self.precision]}
            compiled = openvino.Core().compile_model(str(path), "CPU", hint)
            self.inputs = [node.get_any_name() for node in compiled.inputs]
            shape = compiled.inputs[0].get_partial_shape()
            side = [dim.get_length() if dim.is_static else None for dim in shape]
            outputs = [compiled.output(name) for name in OUTPUTS]

            def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
                result = compiled(feed)
                return [result[output] for output in outputs]

            self._run = run
        else:
            raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS[1:])}")
        self._check_graph_inputs(Path(model_dir) / INFO_FILE, side[-2:])

    def _check_graph_inputs(self, info_path: Path, side: list[int | None]) -> None:
        """model.json's inputs and preprocessing are the graph's: its input names, its image
        side, and the valid mask exactly when the preprocessing pads (never ignored)."""
        size, pads = self.preprocessing.size, self.preprocessing.pads
        if sorted(self.inputs) != sorted(self.info["inputs"]):  # fed by name
            raise _fail(info_path, f"lists inputs {self.info['inputs']}, the graph {self.inputs}")
        if side != [size, size]:
            raise _fail(info_path, f"preprocesses to {size} px; the graph takes {side} images")
        if pads != ("valid_mask" in self.inputs):
            graph = "takes a valid mask" if not pads else "takes no valid mask"
            raise _fail(
                info_path,
                f"preprocesses with geometry {self.preprocessing.geometry}; the graph {graph}",
            )

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def set_support(self, images: torch.Tensor | None) -> None:
        """An export's k-shot memory was encoded at export; it takes no other."""
        if images is not None:
            raise ConfigError(
                f"the export's memory is {self.k_shot}-shot, baked in at export; export again "
                "with the support set to use"
            )

    def check_classes(self, class_names: list[str]) -> None:
        """Refuse classes the export was not traced for."""
        self.class_index(class_names)

    def class_index(self, class_names: list[str]) -> np.ndarray:
        """Each image's class position in the export (a name or a prompt it holds)."""
        missing = sorted(set(class_names) - set(self._index))
        if missing:
            held = ", ".join(entry["name"] for entry in self.classes)
            raise ConfigError(
                f"this export scores {held}, not {', '.join(missing)}; export again with "
                "--class_name naming every class it must score"
            )
        return np.array([self._index[name] for name in class_names], dtype=np.int64)

    def predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        valid_mask: torch.Tensor | None = None,
    ) -> AnomalyOutput:
        """images `[B, 3, S, S]`, one class (name or prompt) per image -> map `[B, S, S]`,
        score `[B]`."""
        index = self.class_index(class_names)
        feed = {"image": images.float().numpy()}
        if "valid_mask" in self.inputs:
            if valid_mask is None:
                valid_mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool)
            feed["valid_mask"] = valid_mask.cpu().numpy().astype(bool)
        if "class_index" in self.inputs:
            feed["class_index"] = index
        anomaly_map, score = self._run(feed)
        return AnomalyOutput(torch.from_numpy(np.asarray(anomaly_map)), torch.from_numpy(score))

    def table_image_scores(self, extrema: MapExtrema, scores: np.ndarray) -> np.ndarray:
        """Paper-table image scores of one class: the exported model's own rule (`predict`'s
        maps' extrema `[N]`, scores `[N]`)."""
        rule = model_class(self.model_name).table_image_scores
        return rule(extrema, scores, self.domain, few_shot=self.k_shot > 0)
