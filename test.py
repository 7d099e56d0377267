"""Evaluate trained checkpoints on a labelled data set, per class then the macro mean.

    python test.py --save_path ckpt/x --dataset MVTec            # image_adapter.pth
    python test.py --save_path ckpt/x --dataset MVTec --all_epochs
    python test.py --checkpoint ckpt/x/image_adapter_15.pth --dataset BTAD --metrics official

The model is read from the checkpoint (`--model` picks one when a folder holds several). Each
model's paper protocol gives the image score; AA-CLIP's (spec aaclip.md §14): maps summed over
levels, per-class min-max of maps and detection scores, image score `0.5 * map max + 0.5 * det`
(industrial) or the map max (medical). That min-max is transductive: fine for paper tables, not
for deployment (predict.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, default_collate

from datasets.anomaly import TestDataset, build_test_datasets, seen_region, to_pixels
from datasets.catalog import DataConfig, real_name
from datasets.metadata import load_test_records, log_resized_masks
from datasets.support import draw_support, load_images
from datasets.synthetic import ensure_synthetic
from models.base import FrozenCLIPModel, MapExtrema
from models.predictor import AnomalyPredictor
from models.registry import (
    MODELS,
    checkpoint_stem,
    config_classes,
    find_checkpoint,
    load_trained_model,
)
from utils.core.checkpoint import check_writable
from utils.core.config import (
    ARCH,
    TEST,
    TRAIN,
    HelpFormatter,
    add_settings,
    from_namespace,
    keys_of,
    parse_with_config,
    settings_of,
    to_mapping,
)
from utils.core.errors import CheckpointError, ConfigError
from utils.core.runtime import (
    loader_workers,
    progress,
    resolve_device,
    run_script,
    seed_everything,
    setup_logging,
)
from utils.engine.training import RunConfig
from utils.evaluation.metrics import (
    COLUMNS_FULL,
    COLUMNS_OFFICIAL,
    PRO_VARIANTS,
    ClassEvaluator,
)
from utils.evaluation.report import format_table, write_results
from utils.evaluation.visualize import save_panels

logger = logging.getLogger("test")

TRAINING_ONLY = ("training_mode", "shot", "augment")


def model_setting_names(kinds: tuple[str, ...]) -> set[str]:
    """Names (and aliases) of every model's settings of these kinds."""
    names: set[str] = set()
    for config_class in config_classes():
        for field in settings_of(config_class, kinds):
            names |= {field.name, *field.metadata["aliases"]}
    return names


def build_parser() -> argparse.ArgumentParser:
    """test.py's flags: run and data, every model's test-time and architectural settings, and
    the evaluation's own."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=None,
        choices=tuple(MODELS),
        help="which model's checkpoints to evaluate; default: the one found in the save path",
    )
    add_settings(parser.add_argument_group("run and data"), RunConfig, exclude=TRAINING_ONLY)
    models = parser.add_argument_group(
        "model settings: default the checkpoint's; test-time ones override it, architectural "
        "ones must equal it (or describe a file of the original code, which stores none)"
    )
    seen: set[str] = set()
    for config_class in config_classes():
        add_settings(models, config_class, (TEST, ARCH), suppress=True, seen=seen)
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="evaluate this checkpoint file, or this run folder's evaluated file (default: the "
        "save path's image_adapter.pth, feclip_best.pth, ...)",
    )
    group.add_argument(
        "--all_epochs",
        action="store_true",
        help="evaluate every per-epoch file (image_adapter_<e>.pth, ...) in numeric order, class "
        "by class: a class's images are decoded once and held (about 3 MB per image at 518 px) "
        "while every file scores them",
    )
    group.add_argument(
        "--results_dir",
        type=Path,
        default=None,
        help="where results_<dataset>.{json,csv,md} go (default: the checkpoint's folder)",
    )
    group.add_argument("--test_batch_size", type=int, default=32, help="images per forward")
    group.add_argument(
        "--metrics",
        default="full",
        choices=("full", "official"),
        help="full: 7 columns; official: AA-CLIP's 4 columns, undefined as 0, "
        "2 decimals of rounded values",
    )
    group.add_argument(
        "--pro_variant",
        default="exact",
        choices=PRO_VARIANTS,
        help="AUPRO as MVTec defines it, AnomalyCLIP's 200-step approximation, or SOWA's "
        "(the same with the mean of per-image FPRs)",
    )
    group.add_argument(
        "--fpr_limit", type=float, default=0.3, help="AUPRO integrates the PRO curve up to this FPR"
    )
    group.add_argument(
        "--k_shot",
        type=int,
        default=0,
        help="SOWA: a memory of k normal train-split images per class (0: zero-shot)",
    )
    group.add_argument(
        "--support_seed",
        type=int,
        default=42,
        help="seed of the k-shot support draw (the original draws unseeded)",
    )
    group.add_argument(
        "--undefined_metric",
        default=None,
        choices=("nan", "zero"),
        help="undefined metrics (one label only): NaN skipped in the mean, or 0 as "
        "the original; default nan, zero with --metrics official",
    )
    group.add_argument(
        "--decimals", type=int, default=None, help="printed decimals (1; official 2)"
    )
    group.add_argument(
        "--visualize",
        action="store_true",
        help="write [image | ground truth | heat map] panels per test image",
    )
    group.add_argument(
        "--vis_size",
        default="model",
        choices=("model", "original"),
        help="panel resolution: the model input or the image's own size",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # A YAML's architecture and training keys describe a training run: the checkpoint holds them.
    known = keys_of(RunConfig, *config_classes()) | {action.dest for action in parser._actions}
    args = parse_with_config(parser, argv, known, ignore=model_setting_names((ARCH, TRAIN)))
    official = args.metrics == "official"
    if args.undefined_metric is None:
        args.undefined_metric = "zero" if official else "nan"
    if args.decimals is None:
        args.decimals = 2 if official else 1
    if args.k_shot < 0:
        raise ConfigError(f"--k_shot {args.k_shot} must be >= 0 (0 means zero-shot)")
    if args.test_batch_size < 1:
        raise ConfigError(f"--test_batch_size {args.test_batch_size} must be >= 1")
    return args


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model settings given on the command line (or as test-time keys of `--config`)."""
    return {
        name: value
        for name, value in vars(args).items()
        if name in model_setting_names((TEST, ARCH))
    }


def checkpoint_files(args: argparse.Namespace) -> tuple[str, list[Path]]:
    """(model name, files to evaluate); every per-epoch file in numeric order for --all_epochs."""
    if args.checkpoint is not None:
        if not args.checkpoint.exists():
            raise CheckpointError(f"--checkpoint {args.checkpoint} does not exist")
        model, file = find_checkpoint(args.checkpoint, args.model, args.trust_checkpoint)
        return model, [file]
    if not args.all_epochs:
        model, main_file = find_checkpoint(args.save_path, args.model, args.trust_checkpoint)
        return model, [main_file]
    for model in [args.model] if args.model else list(MODELS):
        epoch_file = re.compile(rf"{re.escape(checkpoint_stem(model))}_(\d+)\.pth")
        files = [path for path in args.save_path.glob("*.pth") if epoch_file.fullmatch(path.name)]
        if files:
            return model, sorted(files, key=lambda path: int(epoch_file.fullmatch(path.name)[1]))
    raise CheckpointError(f"no per-epoch checkpoints in {args.save_path}; train first")


@dataclasses.dataclass
class ClassOutputs:
    """What test.py keeps of a class's predictions: per image the detection score, label,
    paths and map extrema; the full-size maps, masks and model-size pixels only for panels."""

    det_scores: np.ndarray  # [n]
    labels: np.ndarray  # [n] int64
    extrema: MapExtrema  # each raw map's minimum and maximum, [n] each
    paths: list[str]
    file_names: list[str]
    maps: np.ndarray | None = None  # [n, S, S] float32
    masks: np.ndarray | None = None  # [n, S, S] bool
    pixels: np.ndarray | None = None  # [n, S, S, 3] uint8: the model's input before normalising


def collate_test(items: list[dict]) -> dict:
    """`default_collate`, with masks as bool `[B, S, S]` (a quarter of the float masks)."""
    batch = default_collate(items)
    batch["mask"] = batch["mask"][:, 0].bool()
    return batch


def class_batches(
    datasets: dict[str, TestDataset], batch_size: int, num_workers: int, device: torch.device
) -> Iterator[tuple[str, Iterator[dict]]]:
    """(class name, that class's batches) in order, from one loader over every class: its
    workers start once and keep decoding the next class while a class's metrics are computed
    (a loader per class would idle the device at every class's start). No batch mixes classes.
    """
    ranges, start = [], 0
    for dataset in datasets.values():
        stop = start + len(dataset)
        ranges += [
            list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)
        ]
        start = stop
    loader = DataLoader(
        ConcatDataset(list(datasets.values())),
        batch_sampler=ranges,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_test,
    )
    return itertools.groupby(loader, key=lambda batch: batch["class_name"][0])


@torch.no_grad()
def predict_class(
    predictor: AnomalyPredictor,
    batches: Iterable[dict],
    prompt_name: str,
    evaluator: ClassEvaluator,
    keep_maps: bool = False,
    show_progress: bool = True,
) -> ClassOutputs:
    """Predict a class batch by batch, streaming maps `[B, S, S]` and masks into `evaluator`;
    with `keep_maps` the maps, masks and pixels are also kept (panels)."""
    kept: dict[str, list[np.ndarray]] = {"maps": [], "masks": [], "pixels": []}
    scores, labels, paths, file_names, extrema = [], [], [], [], []
    for batch in progress(batches, show_progress, desc="batches", leave=False):
        output = predictor.predict(batch["image"], [prompt_name] * len(batch["image"]))
        maps = output.anomaly_map.cpu().numpy().astype(np.float32, copy=False)
        masks = batch["mask"].numpy()
        evaluator.update(maps, masks)
        extrema.append(MapExtrema.of(maps))
        if keep_maps:
            kept["maps"].append(maps)
            kept["masks"].append(masks)
            kept["pixels"].append(to_pixels(batch["image"]))
        scores.append(output.image_score.cpu().numpy())
        labels.append(batch["label"].numpy())
        paths.extend(batch["image_path"])
        file_names.extend(batch["file_name"])
    return ClassOutputs(
        det_scores=np.concatenate(scores),
        labels=np.concatenate(labels).astype(np.int64),
        extrema=MapExtrema.concatenate(extrema),
        paths=paths,
        file_names=file_names,
        **({name: np.concatenate(arrays) for name, arrays in kept.items()} if keep_maps else {}),
    )


def class_metrics(
    predictor: AnomalyPredictor,
    batches: Iterable[dict],
    class_name: str,
    size: int,
    args: argparse.Namespace,
    panels: bool = False,
    support: dict[str, list[str]] | None = None,
) -> dict[str, float]:
    """One class's metrics under one trained model (`size` test images); with `panels`, its
    panels are written.

    With `--k_shot` > 0 the predictor's support set holds k normal train-split images of the
    class while it is predicted and scored; their paths go into `support`.
    """
    columns = COLUMNS_OFFICIAL if args.metrics == "official" else COLUMNS_FULL
    pixels_per_map = predictor.model.img_size**2
    evaluator = ClassEvaluator(
        columns, args.fpr_limit, args.pro_variant, size * pixels_per_map, class_name
    )
    if args.k_shot > 0:
        set_support(predictor, class_name, args, support)
    try:
        prompt_name = real_name(args.info, class_name)
        outputs = predict_class(
            predictor, batches, prompt_name, evaluator, panels, show_progress=args.progress
        )
        image_scores = predictor.table_image_scores(outputs.extrema, outputs.det_scores)
    finally:
        if args.k_shot > 0:
            predictor.set_support(None)
    metrics = evaluator.compute(image_scores, outputs.labels)
    if panels:
        write_panels(outputs, class_name, args, predictor.model)
    return metrics


def set_support(
    predictor: AnomalyPredictor,
    class_name: str,
    args: argparse.Namespace,
    support: dict[str, list[str]] | None,
) -> None:
    """Draw the class's k-shot support set (seeded) and hand it to the predictor."""
    paths = draw_support(args.info, args.data_root, class_name, args.k_shot, args.support_seed)
    if support is not None:
        support[class_name] = [Path(path).relative_to(args.data_root).as_posix() for path in paths]
    model = predictor.model
    predictor.set_support(load_images(paths, model.img_size, model.config.preprocess))


def write_panels(
    outputs: ClassOutputs, class_name: str, args: argparse.Namespace, model: FrozenCLIPModel
) -> None:
    """[image | ground truth | heat map] per image; the map min-max normalised over the class.
    At the model's size the image is the loader's (not decoded again); at the original size
    the file is read once more (the full resolution is not held)."""
    maps = outputs.maps
    low, high = float(outputs.extrema.minima.min()), float(outputs.extrema.maxima.max())
    heat = (maps - low) / (high - low) if high > low else np.zeros_like(maps)
    folder = output_folder(args) / "visualization" / args.dataset / class_name
    for index, (path, file_name) in enumerate(zip(outputs.paths, outputs.file_names, strict=True)):
        mask = outputs.masks[index]
        if args.vis_size == "model":
            picture = outputs.pixels[index]
        else:
            with Image.open(path) as file:
                image = seen_region(file.convert("RGB"), model.config.preprocess)
            mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
            picture = np.asarray(image)
        name = Path(file_name).with_suffix("").as_posix().replace("/", "_") + ".png"
        save_panels(folder / name, picture, heat[index], mask=mask)


def output_folder(args: argparse.Namespace) -> Path:
    """Where results, panels and test.log go: --results_dir, else the checkpoint's folder."""
    if args.results_dir is not None:
        return args.results_dir
    if args.checkpoint is not None:
        return args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    return args.save_path


def results_stem(dataset: str, checkpoint: Path, model: str) -> str:
    """`results_<dataset>` for the evaluated checkpoint of a run (`<stem>.pth`, or the kept
    `<stem>_best.pth`), else with the file's stem appended."""
    if checkpoint.stem in (checkpoint_stem(model), f"{checkpoint_stem(model)}_best"):
        return f"results_{dataset}"
    return f"results_{dataset}_{checkpoint.stem}"


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    seed_everything(args.seed)
    data = from_namespace(DataConfig, args)
    args.info = info = data.dataset_info()
    args.data_root = data.root()
    if args.dataset == "Synthetic":
        ensure_synthetic(args.data_root)
    model_name, files = checkpoint_files(args)
    records = load_test_records(info, args.data_root, args.metadata_dir)
    if args.resize_masks:
        log_resized_masks(records, args.data_root)
    columns = COLUMNS_OFFICIAL if args.metrics == "official" else COLUMNS_FULL
    out_dir = output_folder(args)
    overrides = model_overrides(args)
    _, model, payload = load_trained_model(
        files[0], device, model_name, overrides, args.dataset, args.trust_checkpoint
    )
    payloads = {files[0]: payload}
    sources = {files[0]: model.weight_sources}
    preprocessing = dataclasses.replace(
        model.config.preprocessing(train=False), resize_masks=args.resize_masks
    )
    datasets = build_test_datasets(records, args.data_root, model.img_size, preprocessing)
    workers = loader_workers(args.num_workers, device, evaluation=True)
    # Several checkpoints: class by class, each class decoded once and scored by every one.
    cache = len(files) > 1
    logger.info(
        "evaluating %s on %s: %s%s",
        model_name,
        args.dataset,
        ", ".join(path.name for path in files),
        " (each class decoded once and held for every checkpoint)" if cache else "",
    )
    per_file: dict[Path, dict[str, dict[str, float]]] = {path: {} for path in files}
    supports: dict[Path, dict[str, list[str]]] = {path: {} for path in files}
    groups = class_batches(datasets, args.test_batch_size, workers, device)
    bars = args.progress
    for class_name, batches in progress(groups, bars, total=len(datasets), desc="classes"):
        if cache:  # decoded once, scored by every file
            batches = list(progress(batches, bars, desc="loading", leave=False))
        for path in files:
            if cache:  # the same run's next file: same architecture, its weights
                payloads[path] = model.load_trained(path, trust=args.trust_checkpoint)
                sources[path] = model.weight_sources
            predictor = AnomalyPredictor(model, info.domain, args.amp, args.k_shot)
            per_file[path][class_name] = class_metrics(
                predictor,
                batches,
                class_name,
                len(datasets[class_name]),
                args,
                panels=args.visualize and path == files[-1],
                support=supports[path],
            )
        del batches
    settings = to_mapping(model.config)
    for path in files:
        payload, per_class, support = payloads[path], per_file[path], supports[path]
        meta = {
            "dataset": args.dataset,
            "model": model_name,
            "checkpoint": str(path),
            "epoch": payload.get("epoch"),
            "train_seed": (payload.get("config") or {}).get("seed"),
            **sources[path],
            **{
                field.name: settings[field.name]
                for field in settings_of(type(model.config), (TEST,))
            },
            "model_settings": settings,
            "domain": predictor.domain,
            "amp": predictor.amp,
            "resolution": model.img_size,
            "mask_resize": preprocessing.mask_resize,
            "mask_threshold": preprocessing.mask_threshold,
            "preprocess": preprocessing.resize,
            "smoothing": model.smoothing,
            "pro_variant": args.pro_variant,
            "fpr_limit": args.fpr_limit,
            "k_shot": args.k_shot,
            "support_seed": args.support_seed if args.k_shot > 0 else None,
            "support": support,
            "undefined_metric": args.undefined_metric,
            "config": {
                key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()
                if key != "info"
            },
        }
        write_results(
            out_dir,
            results_stem(args.dataset, path, model_name),
            per_class,
            columns,
            meta,
            undefined=args.undefined_metric,
            decimals=args.decimals,
        )
        print(f"\n{args.dataset} | {path.name} (epoch {payload.get('epoch')})\n")
        print(
            format_table(
                per_class, columns, undefined=args.undefined_metric, decimals=args.decimals
            )
        )


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def body() -> None:
        args = parse_args(argv)
        out_dir = output_folder(args)
        check_writable(out_dir, "--results_dir")  # before any work, not after an hour
        setup_logging(out_dir / "test.log", args.log_level)
        run(args)

    return run_script(body, logger)


if __name__ == "__main__":
    raise SystemExit(main())
