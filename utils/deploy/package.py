"""`predict.py export`: a graph that runs without this code, packaged whole in one folder.

The checkpoint is opened by `utils.inference.source.open_predictor` (with a calibration beside
it, its class, domain and model overrides are the defaults; flags win), traced once
(utils/deploy/export.py) with its classes' texts and k-shot memories baked in, and written into a
temporary folder beside `--out` that then replaces it. What the graph sees of an image (whole, or
tiles with `--tile`) is the predictor's `inputs`: the same for the k-shot support, int8's
calibration feeds and the in-folder calibration, which is made on the written graph itself
through the one prediction stream.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from datasets.catalog import DataConfig, default_data_root, get_dataset_info, real_name
from datasets.folder import list_images
from datasets.preprocessing import read_image
from datasets.tiling import TileConfig
from utils.core.checkpoint import check_writable, replaced_folder
from utils.core.config import RUN, redefault, setting
from utils.core.errors import ConfigError, DataError
from utils.core.names import safe_name
from utils.deploy import calibration as calib
from utils.deploy.calibrate import calibrate_on, report_calibration
from utils.deploy.export import (
    FORMATS,
    PRECISIONS,
    check_out,
    check_precision,
    quantize,
    quantize_with_accuracy_control,
    record_calibrations,
)
from utils.deploy.export import export as export_graph
from utils.deploy.field import FieldConfig, ThresholdConfig
from utils.inference.predictor import Predictor, spread
from utils.inference.resolution import at_resolution
from utils.inference.source import ModelSource, Opened, field_class, open_predictor, tiling_flags
from utils.inference.support import SupportConfig, class_folder, support_paths

logger = logging.getLogger("predict")


@dataclasses.dataclass
class ExportConfig(TileConfig, SupportConfig, FieldConfig, ThresholdConfig):
    """`predict.py export`: a graph that runs without this code (traced on the CPU). The graph
    scores one input-sized image; `--tile` sets the tiling its k-shot memory is encoded at and
    its in-folder calibration (and int8 quantization) is made on, which `score --tile` then
    uses."""

    # an export is made from a checkpoint in torch, on the CPU; the export opened here (for its
    # in-folder calibration) is the one just written
    unused: ClassVar[tuple[str, ...]] = (
        "seed",
        "device",
        "num_workers",
        "amp",
        "backend",
        "skip_hash_check",
    )

    format: list[str] = setting(
        ["onnx"],
        "graph formats, written from one trace (openvino: model.xml + model.bin)",
        kind=RUN,
        choices=FORMATS,
    )
    out: Path = setting(None, "output folder", kind=RUN, required=True)
    dataset: str | None = redefault(
        DataConfig,
        "dataset",
        None,
        help="export the classes of this catalogued data set (all, or those --class_name names) "
        "under its prompt names; --k_shot draws their support from its train split",
    )
    data_root: Path | None = redefault(
        DataConfig, "data_root", None, help="with --dataset: its folder; unset: data/<dataset>"
    )
    precision: str = setting(
        "fp32",
        "fp32; bf16 (OpenVINO's inference precision, where the CPU computes bf16 natively); "
        "int8 (NNCF post-training quantization on --calibration_dir; OpenVINO graphs)",
        kind=RUN,
        choices=PRECISIONS,
    )
    calibration_dir: Path | None = setting(
        None,
        "normal images (<dir>/<class>/ with several classes): the graph's thresholds are "
        "calibrated on the exported graph itself, and int8 is quantized on them",
        kind=RUN,
    )
    calibration_size: int = setting(
        300,
        "int8: at most this many images of each class calibrate the quantization (NNCF's "
        "default subset size)",
        kind=RUN,
        minimum=1,
    )
    validation_dir: Path | None = setting(
        None,
        "int8 with accuracy control: labelled images, <dir>/normal/ and <dir>/abnormal/ "
        "(<dir>/<class>/normal/ ... with several classes); NNCF returns operations to float "
        "until image AUROC is within --max_auroc_drop of the fp32 graph's",
        kind=RUN,
    )
    max_auroc_drop: float = setting(
        0.5,
        "int8 with --validation_dir: the most image AUROC (points) the int8 graph may lose",
        kind=RUN,
        minimum=0.0,
    )
    calibration: Path | None = setting(
        None,
        "thresholds to ship beside an fp32 graph without --calibration_dir (default: the "
        "checkpoint's, when there is one)",
        kind=RUN,
    )

    def check(self) -> None:
        """The flags that cannot go together, before anything is read."""
        check_precision(self.precision, self.format)
        self.check_support()
        if self.precision == "int8" and self.calibration_dir is None:
            raise ConfigError(
                "--precision int8 quantizes on normal images: pass --calibration_dir (the folder "
                "predict.py calibrate reads)"
            )
        if self.validation_dir is not None and self.precision != "int8":
            raise ConfigError(
                f"--validation_dir controls int8's accuracy; --precision {self.precision} is not "
                "quantized: drop it, or export --precision int8"
            )
        if self.validation_dir is not None and self.tile:
            raise ConfigError(
                "--validation_dir measures image AUROC on whole images, which a tiled export "
                "does not score: drop --validation_dir (int8 is then quantized on tiles of "
                "--calibration_dir without accuracy control), or export without --tile"
            )


def export(config: ExportConfig, overrides: dict[str, Any]) -> dict[str, Path]:
    """Write the export folder whole; returns {format: graph path}. It is written into a
    temporary folder beside --out that then replaces --out (an export, or a new or empty
    folder): a failed or interrupted export leaves the previous one intact, and no calibration
    or graph of the previous one stays beside the new graph."""
    check_out(config.out)
    with replaced_folder(config.out) as folder:
        return _export_into(config, overrides, folder)


def _export_into(config: ExportConfig, overrides: dict[str, Any], folder: Path) -> dict[str, Path]:
    """`export` writing into `folder`, which becomes --out. With --calibration_dir the
    thresholds are calibrated on the exported graph itself (one calibration per class)."""
    config.check()
    check_writable(config.out, "--out")
    calibration_file = config.calibration or calib.calibration_path(config.checkpoint)
    recorded: dict[str, Any] = {}
    if config.calibration is not None or Path(calibration_file).is_file():
        recorded = calib.load_calibration(calibration_file)
    opened = open_predictor(
        config,
        overrides,
        recorded_overrides=recorded.get("overrides"),
        domain=config.domain,
        recorded_domain=recorded.get("domain"),
        tiling=config.tiling(),
        trust=config.trust_checkpoint,
    )
    overrides = {**recorded.get("overrides", {}), **overrides}
    classes = _classes(config, recorded, opened)
    several = len(classes) > 1
    if config.calibration_dir is not None:  # every class's folder, before the long trace
        for entry in classes:
            list_images(
                class_folder(config.calibration_dir, entry["name"], several, "--calibration_dir")
            )
    scorer = at_resolution(opened.predictor, config, config.batch_size)
    memories, support = _support(config, classes, opened, scorer)
    quantization = None
    if config.precision == "int8":
        quantization = _quantization(config, [entry["name"] for entry in classes], scorer)
    info = {
        "model": opened.provenance,
        "overrides": overrides,  # the model settings given, the calibration's first
        "classes": classes,
        "k_shot": config.k_shot,
        "support": support,
        "created": calib.now(),
    }
    targets = export_graph(
        opened.predictor,
        folder,
        config.format,
        [entry["prompt"] for entry in classes],
        info,
        memories,
        config.precision,
        quantization,
    )
    targets = {fmt: Path(config.out) / path.name for fmt, path in targets.items()}
    paths = ", ".join(str(path) for path in targets.values())
    names = ", ".join(repr(entry["name"]) for entry in classes)
    domain = opened.predictor.domain
    print(f"exported {opened.name} ({config.precision}) for {names} ({domain}) -> {paths}")
    shipped = _calibrations(config, overrides, folder, classes, recorded, calibration_file, opened)
    record_calibrations(folder, shipped)
    return targets


def _calibrations(
    config: ExportConfig,
    overrides: dict[str, Any],
    folder: Path,
    classes: list[dict[str, str]],
    recorded: dict[str, Any],
    calibration_file: Path,
    opened: Opened,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """The calibrations shipped beside the graph, per class: made on the written graph itself
    from --calibration_dir, else the checkpoint's when it fits (an fp32 graph scores as the
    checkpoint does, tested to 1e-6; its class and tiling), else none (a warning)."""
    several = len(classes) > 1
    if config.calibration_dir is not None:
        backend = "openvino" if "openvino" in config.format else "onnxruntime"
        graph = open_predictor(ModelSource(folder, backend=backend), {}, tiling=config.tiling())
        scorer = at_resolution(graph.predictor, config, config.batch_size)
        shipped = {}
        for entry in classes:
            normal = class_folder(
                config.calibration_dir, entry["name"], several, "--calibration_dir"
            )
            calibration = calibrate_on(
                scorer, normal, entry["prompt"], config, config.batch_size, None, config.progress
            )
            provenance = {"model": graph.provenance, "graph": graph.graph, "overrides": overrides}
            calibration.update(provenance)
            stem = safe_name(f"calibration_{entry['name']}") if several else "calibration"
            path = calib.save_calibration(folder / f"{stem}.json", calibration)
            report_calibration(calibration, path)
            shipped[entry["name"]] = (path.name, calibration)
        return shipped
    if (
        recorded
        and config.precision == "fp32"
        and not several
        and recorded["class_name"] in (classes[0]["name"], classes[0]["prompt"])
        and recorded.get("tiling") == config.tiling()
    ):
        calib.check_compatible(recorded, calibration_file, opened, config.tiling())
        calib.save_calibration(folder / "calibration.json", recorded)
        return {classes[0]["name"]: ("calibration.json", recorded)}
    if recorded and recorded.get("tiling") != config.tiling():
        logger.warning(
            "%s was calibrated %s, not %s: not shipped",
            calibration_file,
            tiling_flags(recorded.get("tiling")),
            tiling_flags(config.tiling()),
        )
    logger.warning(
        "no calibration of this graph: pass --calibration_dir, or run predict.py calibrate "
        "--backend openvino --checkpoint %s --normal_dir DIR%s",
        config.out,
        "" if config.tiling() is None else " " + tiling_flags(config.tiling())[5:],
    )
    return {}


def _classes(
    config: ExportConfig, recorded: dict[str, Any], opened: Opened
) -> list[dict[str, str]]:
    """The export's classes: names, and the prompts their texts are made of (without
    --class_name or --dataset, `field_class`'s)."""
    if config.dataset is None:
        given = config.class_name or [None]
        names = [field_class(name, opened, recorded.get("class_name")) for name in given]
        return [{"name": name, "prompt": name} for name in names]
    info = get_dataset_info(config.dataset)
    names = config.class_name or list(info.classes)
    unknown = sorted(set(names) - set(info.classes))
    if unknown:
        raise ConfigError(
            f"{config.dataset} has no class {', '.join(unknown)}; its classes are "
            f"{', '.join(info.classes)}"
        )
    return [{"name": name, "prompt": real_name(info, name)} for name in names]


def _support(
    config: ExportConfig, classes: list[dict[str, str]], opened: Opened, scorer: Predictor
) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """Each class's k-shot memory, encoded from its support images as `scorer` sees images
    (whole, or every tile at the scale scored), and the support files (None: zero-shot)."""
    if config.k_shot == 0:
        return None, None
    model = opened.model
    if not model.supports_memory:
        raise ConfigError(
            f"--k_shot {config.k_shot} needs a support memory (sowa), not {model.name}"
        )
    root = config.data_root or (default_data_root(config.dataset) if config.dataset else None)
    memories, files = [], {}
    for entry in classes:
        paths = support_paths(config, entry["name"], len(classes) > 1, config.dataset, root)
        files[entry["name"]] = [str(path) for path in paths]
        with torch.no_grad():
            memories.append(model.encode_memory(scorer.support_images(paths)))
    return memories, {"seed": config.support_seed, "files": files, "tiling": config.tiling()}


def feeds(folder: Path, scorer: Predictor, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """One graph feed per input the model sees of a folder's readable images (`scorer.inputs`:
    an image, or its tiles), at most `limit` in all, spread over the images and their tiles."""
    files = spread(list_images(folder), limit)
    per_image = None if limit is None else -(-limit // len(files))  # ceil
    pad_color = scorer.preprocessing.pad_color
    result = []
    for path in files:
        try:
            inputs = scorer.inputs(read_image(path, pad_color), per_image)
        except DataError as error:
            logger.warning("skipped: %s", error)
            continue
        for pixels, valid_mask in zip(inputs.images, inputs.valid_mask, strict=True):
            feed = {"image": pixels[None].numpy()}
            if scorer.preprocessing.pads:
                feed["valid_mask"] = valid_mask[None].numpy()
            result.append(feed)
    if not result:
        raise DataError(f"no image under {folder} could be read")
    return spread(result, limit)  # tiles: a few per image, rounded up


def _quantization(config: ExportConfig, names: list[str], scorer: Predictor) -> Any:
    """int8: the quantization an export runs on its OpenVINO model (calibration feeds from
    --calibration_dir; with --validation_dir, under accuracy control)."""
    several = len(names) > 1
    calibration, validation = [], []
    for index, name in enumerate(names):
        folder = class_folder(config.calibration_dir, name, several, "--calibration_dir")
        for feed in feeds(folder, scorer, config.calibration_size):
            # the backbone's activations: each image under its own class
            calibration.append(_with_class(feed, index, several))
        if config.validation_dir is not None:
            labelled = class_folder(config.validation_dir, name, several, "--validation_dir")
            for label, kind in enumerate(("normal", "abnormal")):
                if not (labelled / kind).is_dir():
                    raise DataError(
                        f"--validation_dir {labelled} has no {kind}/ folder; it holds normal/ "
                        "and abnormal/ images"
                    )
                for feed in feeds(labelled / kind, scorer):
                    validation.append((_with_class(feed, index, several), label, index))
    if config.validation_dir is None:
        return lambda model: (quantize(model, calibration, config.calibration_size), None)
    return lambda model: quantize_with_accuracy_control(
        model, calibration, config.calibration_size, validation, config.max_auroc_drop
    )


def _with_class(feed: dict[str, np.ndarray], index: int, several: bool) -> dict[str, np.ndarray]:
    """A feed of a several-class graph names its class."""
    return {**feed, "class_index": np.array([index])} if several else feed
