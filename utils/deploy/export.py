"""Export a trained model to a self-contained ONNX or OpenVINO graph (the write side; running
an export is `utils.inference.graph`'s).

The graph is `image [B, 3, S, S] (+ valid_mask [B, S, S] when letterboxed) (+ class_index [B]
when it scores several classes) -> anomaly_map [B, S, S], image_score [B]`, float32 outputs,
with a dynamic batch: `predict` on raw outputs. Each class's text (its anchors, and the
cross-attention variant's text context) is computed once at export and baked in as constants, so
the graph has no text tower and needs no tokenizer; so is SOWA's k-shot memory of each class
(`memories`), so a k-shot SOWA deploys as k-shot. Beside the graph, `model.json` records what a
runtime needs to feed it and to decide: the predictor's exact preprocessing
(`Preprocessing.to_dict`: size, geometry, resize backend, interpolation, pad colour, mean, std), the
classes (name and prompt), the domain, the k-shot support (and the tiling its memory was encoded
at), the precision, the model settings given, the calibration when there is one, the SHA-256 of
every graph file and what produced it (model name and config, checkpoint hash).
`utils.inference.graph.ExportedPredictor` rebuilds that preprocessing from model.json and
applies exactly it.

Precisions (`--precision`, OpenVINO graphs): fp32; bf16, OpenVINO's inference precision hint,
only where the CPU computes bf16 natively (AMX, AVX512-bf16); int8, NNCF's post-training
quantization of the OpenVINO model on normal images (its default settings: NNCF's transformer
model type broke these graphs' batch dimension, see `quantize`), optionally with NNCF's accuracy
control on labelled images (`quantize_with_accuracy_control`): operations go back to float until
image AUROC is within a bound of the fp32 graph's, and model.json records the drop reached.

Cross-attention's `cross_attn_at_test=both` is refused: it runs the text tower per image.
onnx, onnxruntime, onnxscript (torch's ONNX exporter), openvino and nncf are the optional
deployment extra (requirements-deploy.txt), imported only when used.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from models.base import FrozenCLIPModel, select_texts, stack_texts
from utils.core.checkpoint import atomic_write, file_sha256
from utils.core.errors import ConfigError
from utils.core.runtime import cpu_kind, native_bf16
from utils.inference.graph import (
    FORMATS,
    GRAPH_FILES,
    INFO_FILE,
    OPENVINO_HINTS,
    OUTPUTS,
    PRECISIONS,
    WEIGHTS_FILE,
    export_id,
    read_info,
    require,
)
from utils.inference.predictor import AnomalyPredictor

logger = logging.getLogger(__name__)

OPSET = 18


class ExportGraph(nn.Module):
    """`predict` of a fixed list of classes with their texts (and k-shot memories) as constants:
    image `[B, 3, S, S]`, valid_mask `[B, S, S]` bool (letterboxed) or None, class_index `[B]`
    int64 (several classes) or None -> (anomaly map `[B, S, S]`, score `[B]`)."""

    def __init__(
        self,
        model: FrozenCLIPModel,
        class_names: Sequence[str],
        domain: str,
        memories: Sequence[Any] | None = None,
    ) -> None:
        super().__init__()
        if getattr(model.config, "cross_attn_at_test", None) == "both":
            raise ConfigError(
                "cross_attn_at_test=both runs the text tower per image and cannot be baked into "
                "a graph; export with --cross_attn_at_test image or none"
            )
        self.model = model.eval()
        self.class_names = list(class_names)
        self.domain = domain
        with torch.no_grad():
            # [C, ...] per class; one class's broadcasts over the batch (no class input)
            self.texts = stack_texts([model.class_text(name) for name in self.class_names])
        self.memory = None
        if memories is not None:  # per stage [C, N, D]
            self.memory = [torch.stack(stage) for stage in zip(*memories, strict=True)]

    def forward(
        self,
        image: torch.Tensor,
        valid_mask: torch.Tensor | None = None,
        class_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        texts, memory = self.texts, self.memory
        if class_index is not None:
            texts = select_texts(texts, class_index)
            memory = None if memory is None else [stage[class_index] for stage in memory]
        output = self.model._predict(
            image, self.class_names, texts, valid_mask, memory, self.domain
        )
        return output.anomaly_map.float(), output.image_score.float()


def _onnx(graph: ExportGraph, img_size: int, letterbox: bool, path: Path) -> list[str]:
    """Trace `graph` with a symbolic batch and write the ONNX file `path` (checked); returns
    the graph's input names."""
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (torch's exporter)")
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = {"image": torch.rand(2, 3, img_size, img_size)}  # batch 2: 1 would be specialised
    if letterbox:
        example["valid_mask"] = torch.ones(2, img_size, img_size, dtype=torch.bool)
    if len(graph.class_names) > 1:
        example["class_index"] = torch.arange(2) % len(graph.class_names)
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines narrate every rewrite
        logging.getLogger(name).setLevel(logging.WARNING)
    image = example.pop("image")
    shapes = {"image": {0: batch}, **{name: {0: batch} for name in example}}
    with torch.no_grad():
        program = torch.export.export(
            graph, (image,), kwargs=example, dynamic_shapes=shapes, strict=False
        )
    weights = sum(p.numel() * p.element_size() for p in graph.parameters())
    names = ["image", *example]
    torch.onnx.export(
        program,
        f=str(path),
        input_names=names,
        output_names=list(OUTPUTS),
        opset_version=OPSET,
        external_data=weights > 1_800_000_000,  # protobuf's 2 GB limit
        optimize=False,  # 40% of the export time; onnxruntime and OpenVINO optimise at load
        verbose=False,
    )
    onnx.checker.check_model(str(path))
    return names


def check_precision(precision: str, formats: Sequence[str]) -> None:
    """One line for a precision this export cannot have: unknown, outside OpenVINO, or bf16 on a
    CPU that would only emulate it."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and list(formats) != ["openvino"]:
        raise ConfigError(
            f"--precision {precision} is an OpenVINO graph's; export it with --format openvino "
            "alone (onnxruntime scores fp32 graphs)"
        )
    if precision == "bf16" and not native_bf16(torch.device("cpu")):
        raise ConfigError(
            f"--precision bf16 needs a CPU that computes bf16 natively (AVX512-bf16 or AMX); this "
            f"one ({cpu_kind()}) would emulate it, which made ViT-L inference 6.5x slower than "
            "fp32 on such a CPU (README Performance): export fp32 or int8"
        )


def _anchor_products(model: Any) -> Any:
    """NNCF's ignored scope for an OpenVINO model: the products with the text anchors (MatMuls
    whose output's last dimension is 2, normal and anomalous). They are a few thousand of the
    ViT's billions of operations, so int8 gains nothing there, and OpenVINO's CPU plugin computed
    a wrong shape (image_score `(1, 2)`) once NNCF's accuracy control took the output quantizer
    of such a product away while its int8 weights stayed."""
    nncf = require("nncf", "--precision int8")
    names = []
    for op in model.get_ops():
        last = op.get_output_partial_shape(0)[-1] if op.get_type_name() == "MatMul" else None
        if last is not None and last.is_static and last.get_length() == 2:
            names.append(op.get_friendly_name())
    return nncf.IgnoredScope(names=names, validate=False)


def quantize(model: Any, feeds: list[dict[str, np.ndarray]], subset_size: int) -> Any:
    """NNCF int8 post-training quantization of an OpenVINO model, calibrated on `feeds` (normal
    images, one feed each), with NNCF's default settings: its transformer model type
    (SmoothQuant) made these graphs' image score `(1, 2)` for any batch."""
    nncf = require("nncf", "--precision int8")
    return nncf.quantize(
        model, nncf.Dataset(feeds), subset_size=subset_size, ignored_scope=_anchor_products(model)
    )


def validate_graph(
    compiled: Any, items: Iterable[tuple[dict[str, np.ndarray], int, int]]
) -> tuple[float, list[list[np.ndarray]]]:
    """A compiled OpenVINO graph on labelled feeds `(feed, label 0/1, class position)` -> (mean
    over classes of the image AUROC of its `image_score`, 0.5 where no class has both labels;
    each item's outputs). The outputs put NNCF's accuracy control in its "logits" mode: it ranks
    operations by how far their quantization moves each image's map and score (AUROC needs both
    labels, so it has no per-image value of its own)."""
    items = list(items)
    outputs = []
    for feed, _, _ in items:
        result = compiled(feed)
        outputs.append([result[compiled.output(name)] for name in OUTPUTS])
    return _mean_auroc([float(output[1][0]) for output in outputs], items), outputs


def image_auroc(compiled: Any, items: Sequence[tuple[dict[str, np.ndarray], int, int]]) -> float:
    """`validate_graph`'s AUROC alone."""
    return validate_graph(compiled, items)[0]


def _mean_auroc(scores: Sequence[float], items: Sequence[tuple[Any, int, int]]) -> float:
    values = []
    for index in sorted({position for _, _, position in items}):
        chosen = [i for i, (_, _, position) in enumerate(items) if position == index]
        labels = [items[i][1] for i in chosen]
        if 0 < sum(labels) < len(labels):
            values.append(roc_auc_score(labels, [scores[i] for i in chosen]))
    return float(np.mean(values)) if values else 0.5


def quantize_with_accuracy_control(
    model: Any,
    feeds: list[dict[str, np.ndarray]],
    subset_size: int,
    validation: list[tuple[dict[str, np.ndarray], int, int]],
    max_drop: float,
) -> tuple[Any, dict[str, Any]]:
    """`quantize`, then NNCF's accuracy control: operations return to float, those whose
    quantization moves the graph's outputs most on `validation` (labelled feeds) first, until
    the mean image AUROC is at most `max_drop` points below the fp32 graph's. Returns the
    model and what was reached; a drop still above the bound is a one-line error."""
    nncf = require("nncf", "--precision int8 --validation_dir")
    openvino = require("openvino", "--precision int8 --validation_dir")
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    controlled = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(feeds),
        nncf.Dataset(validation, lambda item: item[0]),
        validate_graph,
        max_drop=max_drop / 100,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=subset_size,
        ignored_scope=_anchor_products(model),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            num_ranking_workers=1  # each worker compiles a model; one keeps memory bounded
        ),
    )
    core, hint = openvino.Core(), {"INFERENCE_PRECISION_HINT": OPENVINO_HINTS["int8"]}
    reference = image_auroc(core.compile_model(model, "CPU", hint), validation)
    reached = image_auroc(core.compile_model(controlled, "CPU", hint), validation)
    drop = 100 * (reference - reached)
    labels = [label for _, label, _ in validation]
    record = {
        "metric": "image AUROC (image_score), mean over classes",
        "fp32": round(100 * reference, 4),
        "int8": round(100 * reached, 4),
        "drop": round(drop, 4),
        "max_drop": max_drop,
        "images": {"normal": labels.count(0), "abnormal": labels.count(1)},
    }
    logger.info(
        "accuracy control: image AUROC fp32 %.2f, int8 %.2f (drop %.2f points, bound %.2f)",
        100 * reference,
        100 * reached,
        drop,
        max_drop,
    )
    if drop > max_drop:
        raise ConfigError(
            f"int8 with accuracy control still loses {drop:.2f} points of image AUROC on "
            f"--validation_dir (bound {max_drop:g}): export fp32 or bf16, or raise --max_auroc_drop"
        )
    return controlled, record


def export(
    predictor: AnomalyPredictor,
    out_dir: Path,
    formats: list[str],
    class_names: Sequence[str],
    info: dict[str, Any],
    memories: Sequence[Any] | None = None,
    precision: str = "fp32",
    quantization: Callable[[Any], tuple[Any, dict[str, Any] | None]] | None = None,
) -> dict[str, Path]:
    """Write `<out_dir>/model.onnx` and/or `model.xml` + `model.bin` (one trace for all
    `formats`) and `model.json` for the predictor's model, domain and preprocessing scoring
    `class_names` (prompt names; `memories` per class a k-shot memory); returns {format: graph
    path}. int8 needs `quantization(openvino model) -> (quantized model, accuracy control
    record or None)`. `info` (model name, config, checkpoint, classes, support, calibration)
    goes into the JSON."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown --format {unknown}; use {' and/or '.join(FORMATS)}")
    check_precision(precision, formats)
    if precision == "int8" and quantization is None:
        raise ConfigError(
            "--precision int8 needs normal images to calibrate on (--calibration_dir)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, domain, letterbox = predictor.model, predictor.domain, predictor.preprocessing.pads
    graph = ExportGraph(model.cpu(), class_names, domain, memories)
    targets = {fmt: out_dir / GRAPH_FILES[fmt] for fmt in FORMATS if fmt in formats}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        logger.info(
            "tracing %s for %s (%s) at %d px",
            model.name,
            ", ".join(repr(name) for name in class_names),
            domain,
            model.img_size,
        )
        inputs = _onnx(graph, model.img_size, letterbox, onnx_path)
        written, control = {}, None
        if "openvino" in targets:
            openvino = require("openvino", "OpenVINO export")
            converted = openvino.convert_model(onnx_path)
            if precision == "int8":
                converted, control = quantization(converted)
            xml = Path(scratch) / "model.xml"
            # float32 weights: the parity the backends are tested to; int8 keeps its own. The
            # IR is written apart and moved into place whole, never over a file in use.
            openvino.save_model(converted, xml, compress_to_fp16=False)
            written = {xml: targets["openvino"], xml.with_suffix(".bin"): out_dir / WEIGHTS_FILE}
        if "onnx" in targets:
            written[onnx_path] = targets["onnx"]
            for weights in Path(scratch).glob("model.onnx.*"):  # external data, past 2 GB
                written[weights] = out_dir / weights.name
        for source, destination in written.items():
            os.replace(source, destination)  # whole files only, as the checkpoints
    files = {path.name: file_sha256(path) for path in sorted(set(written.values()))}
    description = {
        "graphs": {fmt: path.name for fmt, path in targets.items()},
        "inputs": inputs,
        "outputs": {"anomaly_map": "[B, S, S] float32", "image_score": "[B] float32"},
        "files": files,
        "export_id": export_id(files),
        "opset": OPSET,
        "precision": precision,
        **({"accuracy_control": control} if control is not None else {}),
        "preprocessing": predictor.preprocessing.to_dict(),
        "domain": domain,
        **info,
    }
    text = json.dumps(description, indent=2, default=str) + "\n"
    atomic_write(out_dir / INFO_FILE, lambda file: file.write(text), mode="w")
    return targets


def check_out(out_dir: Path) -> None:
    """`--out` is new, empty or an export (an export is replaced whole); another folder with
    files is refused, so no file of it ends up beside a graph."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / INFO_FILE).is_file()):
        raise ConfigError(
            f"--out {out_dir} holds files but no {INFO_FILE}, so it is not an export; an export "
            "replaces its whole folder: choose a new or empty one"
        )


def record_calibrations(model_dir: Path, calibrations: dict[str, dict[str, Any]]) -> None:
    """Add to model.json, per class, the calibration file shipped beside the graph and what it
    holds (thresholds, percentile, rule, reduction, top fraction, the graph it was made on)."""
    info = read_info(model_dir)
    info["calibrations"] = {
        name: {
            "file": file,
            **{
                key: calibration[key]
                for key in ("thresholds", "percentile", "rule", "reduction", "top_fraction")
            },
            "graph": calibration.get("graph"),
        }
        for name, (file, calibration) in calibrations.items()
    }
    text = json.dumps(info, indent=2, default=str) + "\n"
    atomic_write(Path(model_dir) / INFO_FILE, lambda file: file.write(text), mode="w")
