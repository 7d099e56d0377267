"""Export a trained model to a self-contained ONNX or OpenVINO graph, and run such exports.

The graph is `image [B, 3, S, S] (+ valid_mask [B, S, S] when letterboxed) -> anomaly_map
[B, S, S], image_score [B]`, float32, with a dynamic batch: `predict` of one class on raw outputs.
The class's text anchors are computed once at export and baked in as constants, so the graph has
no text tower and needs no tokenizer. Beside it, `model.json` records what a runtime needs to
feed it and to decide: the predictor's exact preprocessing (`Preprocessing.to_dict`: size,
geometry, resize backend, interpolation, pad colour, mean, std), the class, the domain, the
calibration when there is one, and what produced it (model name and config, checkpoint hash).
`ExportedPredictor` rebuilds that preprocessing from model.json and applies exactly it.

Exports are zero-shot: SOWA's k-shot support memory is not exported (predict.py scores zero-shot;
a memory would be one more constant, but no command sets a support folder for scoring), and
cross-attention's `cross_attn_at_test=both` is refused: it runs the text tower per image.

onnx, onnxruntime, onnxscript (torch's ONNX exporter) and openvino are the optional deployment
extra (requirements-deploy.txt), imported only here and only when used.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datasets.preprocessing import Preprocessing
from models.base import AnomalyOutput, FrozenCLIPModel
from models.predictor import AnomalyPredictor
from utils.core.checkpoint import atomic_write, file_sha256
from utils.core.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
BACKENDS = ("torch", "onnxruntime", "openvino")
OPSET = 18
INFO_FILE = "model.json"
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}  # OpenVINO's weights: model.bin
EXTRA_HINT = "pip install -r requirements-deploy.txt"


def require(module: str, purpose: str) -> Any:
    """Import an optional deployment module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the {module} package; {EXTRA_HINT}") from None


class ExportGraph(nn.Module):
    """One class's `predict` with its text anchors as constants: images `[B, 3, S, S]` and,
    when letterboxed, valid_mask `[B, S, S]` bool -> (anomaly map `[B, S, S]`, score `[B]`)."""

    def __init__(self, model: FrozenCLIPModel, class_name: str, domain: str) -> None:
        super().__init__()
        if getattr(model.config, "cross_attn_at_test", None) == "both":
            raise ConfigError(
                "cross_attn_at_test=both runs the text tower per image and cannot be baked into "
                "a graph; export with --cross_attn_at_test image or none"
            )
        self.model = model.eval()
        self.class_name = class_name
        self.domain = domain
        with torch.no_grad():
            self.text = model.class_text(class_name)

    def forward(
        self, images: torch.Tensor, valid_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One text for the whole batch: the anchors broadcast over it (a list of B texts would
        # fix B in the graph).
        output = self.model._predict(
            images, [self.class_name], [self.text], valid_mask, None, self.domain
        )
        return output.anomaly_map.float(), output.image_score.float()


def _onnx(graph: ExportGraph, img_size: int, letterbox: bool, path: Path) -> None:
    """Trace `graph` with a symbolic batch and write the ONNX file `path` (checked)."""
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (torch's exporter)")
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = (torch.rand(2, 3, img_size, img_size),)  # batch 2: 1 would be specialised
    shapes: tuple[dict[int, Any], ...] = ({0: batch},)
    names = ["image"]
    if letterbox:
        example += (torch.ones(2, img_size, img_size, dtype=torch.bool),)
        shapes += ({0: batch},)
        names.append("valid_mask")
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines narrate every rewrite
        logging.getLogger(name).setLevel(logging.WARNING)
    with torch.no_grad():
        program = torch.export.export(graph, example, dynamic_shapes=shapes, strict=False)
    weights = sum(p.numel() * p.element_size() for p in graph.parameters())
    torch.onnx.export(
        program,
        f=str(path),
        input_names=names,
        output_names=["anomaly_map", "image_score"],
        opset_version=OPSET,
        external_data=weights > 1_800_000_000,  # protobuf's 2 GB limit
        optimize=False,  # 40% of the export time; onnxruntime and OpenVINO optimise at load
        verbose=False,
    )
    onnx.checker.check_model(str(path))


def export(
    predictor: AnomalyPredictor,
    out_dir: Path,
    formats: list[str],
    class_name: str,
    info: dict[str, Any],
) -> dict[str, Path]:
    """Write `<out_dir>/model.onnx` and/or `model.xml` + `.bin` (one trace for all `formats`)
    and `model.json` for the predictor's model, domain and preprocessing scoring `class_name`;
    returns {format: graph path}. `info` (model name, config, checkpoint, calibration) goes into
    the JSON."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown --format {unknown}; use {' and/or '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, domain, letterbox = predictor.model, predictor.domain, predictor.preprocessing.pads
    graph = ExportGraph(model.cpu(), class_name, domain)
    targets = {fmt: out_dir / GRAPH_FILES[fmt] for fmt in FORMATS if fmt in formats}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        logger.info(
            "tracing %s for %r (%s) at %d px", model.name, class_name, domain, model.img_size
        )
        _onnx(graph, model.img_size, letterbox, onnx_path)
        written = {}
        if "openvino" in targets:
            openvino = require("openvino", "OpenVINO export")
            xml = Path(scratch) / "model.xml"
            # float32 weights: the parity the backends are tested to
            openvino.save_model(openvino.convert_model(onnx_path), xml, compress_to_fp16=False)
            written = {xml: targets["openvino"], xml.with_suffix(".bin"): out_dir / "model.bin"}
        if "onnx" in targets:
            written[onnx_path] = targets["onnx"]
            for weights in Path(scratch).glob("model.onnx.*"):  # external data, past 2 GB
                written[weights] = out_dir / weights.name
        for source, destination in written.items():
            os.replace(source, destination)  # whole files only, as the checkpoints
    description = {
        "graphs": {fmt: path.name for fmt, path in targets.items()},
        "inputs": ["image", "valid_mask"] if letterbox else ["image"],
        "outputs": {"anomaly_map": "[B, S, S] float32", "image_score": "[B] float32"},
        "sha256": {fmt: file_sha256(path) for fmt, path in targets.items()},
        "opset": OPSET,
        "preprocessing": predictor.preprocessing.to_dict(),
        "class_name": class_name,
        "domain": domain,
        "k_shot": 0,
        **info,
    }
    text = json.dumps(description, indent=2, default=str) + "\n"
    atomic_write(out_dir / INFO_FILE, lambda file: file.write(text), mode="w")
    return targets


def read_info(model_dir: Path) -> dict[str, Any]:
    """The `model.json` of an export folder, or a one-line error."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} holds no {INFO_FILE}; with --backend onnxruntime or openvino pass the "
            "folder `predict.py export --out` wrote"
        )
    return json.loads(path.read_text())


class ExportedPredictor:
    """An exported graph behind `AnomalyPredictor`'s `predict`, on the CPU.

    backend: `onnxruntime` or `openvino`; the class and domain are the export's.
    """

    def __init__(self, model_dir: Path, backend: str) -> None:
        self.info = read_info(model_dir)
        self.backend = backend
        self.preprocessing = Preprocessing.from_dict(
            self.info.get("preprocessing"), f"{Path(model_dir) / INFO_FILE}"
        )
        self.class_name, self.domain = self.info["class_name"], self.info["domain"]
        graphs = self.info["graphs"]
        if backend == "onnxruntime":
            runtime = require("onnxruntime", "--backend onnxruntime")
            if "onnx" not in graphs:
                raise ConfigError(
                    f"{model_dir} holds no ONNX graph; use --backend openvino or export again "
                    "with --format onnx"
                )
            path = Path(model_dir) / graphs["onnx"]
            session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.inputs = [node.name for node in session.get_inputs()]
            self._run = lambda feed: session.run(["anomaly_map", "image_score"], feed)
        elif backend == "openvino":
            openvino = require("openvino", "--backend openvino")
            path = Path(model_dir) / graphs.get("openvino", graphs.get("onnx"))  # reads ONNX too
            # f32: OpenVINO would otherwise infer in bf16 on CPUs that have it
            compiled = openvino.Core().compile_model(
                str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
            )
            self.inputs = [node.get_any_name() for node in compiled.inputs]
            outputs = [compiled.output("anomaly_map"), compiled.output("image_score")]

            def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
                result = compiled(feed)
                return [result[output] for output in outputs]

            self._run = run
        else:
            raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS[1:])}")

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def predict(
        self,
        images: torch.Tensor,
        class_names: list[str],
        valid_mask: torch.Tensor | None = None,
    ) -> AnomalyOutput:
        """images `[B, 3, S, S]` (class names: the export's) -> map `[B, S, S]`, score `[B]`."""
        if set(class_names) - {self.class_name}:
            raise ConfigError(
                f"this export scores {self.class_name!r} only; export again with --class_name"
            )
        feed = {"image": images.float().numpy()}
        if "valid_mask" in self.inputs:
            if valid_mask is None:
                valid_mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool)
            feed["valid_mask"] = valid_mask.cpu().numpy().astype(bool)
        anomaly_map, score = self._run(feed)
        return AnomalyOutput(torch.from_numpy(np.asarray(anomaly_map)), torch.from_numpy(score))
