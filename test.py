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
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.anomaly import TestDataset, build_test_datasets, resize_image, seen_region
from datasets.catalog import default_data_root, get_dataset_info, real_name
from datasets.metadata import load_test_records, log_resized_masks
from datasets.support import draw_support, load_images
from datasets.synthetic import ensure_synthetic
from models.base import FrozenCLIPModel
from models.predictor import AnomalyPredictor
from models.registry import (
    MODELS,
    checkpoint_stem,
    config_classes,
    find_checkpoint,
    load_trained_model,
)
from utils.checkpoint import check_writable
from utils.config import (
    ARCH,
    TEST,
    TRAIN,
    HelpFormatter,
    add_settings,
    keys_of,
    parse_with_config,
    settings_of,
    to_mapping,
)
from utils.errors import CheckpointError, ConfigError
from utils.metrics import COLUMNS_FULL, COLUMNS_OFFICIAL, PRO_VARIANTS, evaluate_class
from utils.report import format_table, write_results
from utils.runtime import (
    loader_workers,
    progress,
    resolve_device,
    run_script,
    seed_everything,
    setup_logging,
)
from utils.training import RunConfig, configure_data_set, set_switches
from utils.visualize import save_panels

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
        help="evaluate every per-epoch file (image_adapter_<e>.pth, ...) in numeric order",
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
    set_switches(args)
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
        model, file = find_checkpoint(args.checkpoint, args.model)
        return model, [file]
    if not args.all_epochs:
        model, main_file = find_checkpoint(args.save_path, args.model)
        return model, [main_file]
    for model in [args.model] if args.model else list(MODELS):
        epoch_file = re.compile(rf"{re.escape(checkpoint_stem(model))}_(\d+)\.pth")
        files = [path for path in args.save_path.glob("*.pth") if epoch_file.fullmatch(path.name)]
        if files:
            return model, sorted(files, key=lambda path: int(epoch_file.fullmatch(path.name)[1]))
    raise CheckpointError(f"no per-epoch checkpoints in {args.save_path}; train first")


@torch.no_grad()
def predict_class(
    predictor: AnomalyPredictor,
    dataset: TestDataset,
    prompt_name: str,
    batch_size: int,
    num_workers: int,
) -> dict[str, np.ndarray | list]:
    """Raw maps `[n, S, S]`, image scores `[n]`, masks `[n, S, S]`, labels `[n]` of a class."""
    cuda = predictor.device.type == "cuda"
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda
    )
    maps, scores, masks, labels, paths, file_names = [], [], [], [], [], []
    for batch in progress(loader, desc="batches", leave=False):
        output = predictor.predict(batch["image"], [prompt_name] * len(batch["image"]))
        maps.append(output.anomaly_map.cpu().numpy())
        scores.append(output.image_score.cpu().numpy())
        masks.append(batch["mask"][:, 0].numpy().astype(bool))
        labels.append(batch["label"].numpy())
        paths.extend(batch["image_path"])
        file_names.extend(batch["file_name"])
    return {
        "maps": np.concatenate(maps).astype(np.float32),
        "det_scores": np.concatenate(scores),
        "masks": np.concatenate(masks),
        "labels": np.concatenate(labels).astype(np.int64),
        "paths": paths,
        "file_names": file_names,
    }


def evaluate(
    predictor: AnomalyPredictor,
    datasets: dict[str, TestDataset],
    args: argparse.Namespace,
    visualize: bool,
    support: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-class metrics of one trained model.

    With `--k_shot` > 0 the predictor's support set holds k normal train-split images of each
    class while the class is predicted and scored; their paths go into `support`.
    """
    columns = COLUMNS_OFFICIAL if args.metrics == "official" else COLUMNS_FULL
    workers = loader_workers(args.num_workers, predictor.device, evaluation=True)
    per_class = {}
    for class_name, dataset in progress(datasets.items(), desc="classes"):
        prompt_name = real_name(args.dataset, class_name)
        if args.k_shot > 0:
            set_support(predictor, class_name, args, support)
        try:
            outputs = predict_class(predictor, dataset, prompt_name, args.test_batch_size, workers)
            image_scores = predictor.table_image_scores(outputs["maps"], outputs["det_scores"])
        finally:
            if args.k_shot > 0:
                predictor.set_support(None)
        per_class[class_name] = evaluate_class(
            outputs["maps"],
            outputs["masks"],
            image_scores,
            outputs["labels"],
            columns,
            fpr_limit=args.fpr_limit,
            pro_variant=args.pro_variant,
        )
        if visualize:
            write_panels(outputs, class_name, args, predictor.model)
    return per_class


def set_support(
    predictor: AnomalyPredictor,
    class_name: str,
    args: argparse.Namespace,
    support: dict[str, list[str]] | None,
) -> None:
    """Draw the class's k-shot support set (seeded) and hand it to the predictor."""
    paths = draw_support(args.dataset, args.data_root, class_name, args.k_shot, args.support_seed)
    if support is not None:
        support[class_name] = [Path(path).relative_to(args.data_root).as_posix() for path in paths]
    model = predictor.model
    predictor.set_support(load_images(paths, model.img_size, model.config.preprocess))


def write_panels(
    outputs: dict, class_name: str, args: argparse.Namespace, model: FrozenCLIPModel
) -> None:
    """[image | ground truth | heat map] per image; the map min-max normalised over the class."""
    maps = outputs["maps"]
    low, high = float(maps.min()), float(maps.max())
    heat = (maps - low) / (high - low) if high > low else np.zeros_like(maps)
    folder = output_folder(args) / "visualization" / args.dataset / class_name
    for index, (path, file_name) in enumerate(
        zip(outputs["paths"], outputs["file_names"], strict=True)
    ):
        image = Image.open(path).convert("RGB")
        if args.vis_size == "model":
            image = resize_image(image, model.img_size, model.config.preprocess)
        else:
            image = seen_region(image, model.config.preprocess)
        mask = outputs["masks"][index]
        if args.vis_size == "original":
            mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
        name = Path(file_name).with_suffix("").as_posix().replace("/", "_") + ".png"
        save_panels(folder / name, np.asarray(image), heat[index], mask=mask)


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
    configure_data_set(args)
    info = get_dataset_info(args.dataset)
    if args.data_root is None:
        args.data_root = default_data_root(args.dataset)
    if args.dataset == "Synthetic":
        ensure_synthetic(args.data_root)
    model_name, files = checkpoint_files(args)
    records = load_test_records(args.dataset, args.data_root, args.metadata_dir)
    if args.resize_masks:
        log_resized_masks(records, args.data_root)
    columns = COLUMNS_OFFICIAL if args.metrics == "official" else COLUMNS_FULL
    out_dir = output_folder(args)
    overrides = model_overrides(args)
    model = None
    for path in files:
        if model is None:
            _, model, payload = load_trained_model(
                path, device, model_name, overrides, args.dataset
            )
        else:  # the next epoch of the same run: same architecture, reload its weights
            payload = model.load_trained(path)
        predictor = AnomalyPredictor(model, info.domain, args.amp, args.k_shot)
        preprocessing = dataclasses.replace(
            model.config.preprocessing(train=False), resize_masks=args.resize_masks
        )
        datasets = build_test_datasets(records, args.data_root, model.img_size, preprocessing)
        logger.info(
            "evaluating %s %s (epoch %s) on %s",
            model_name,
            path,
            payload.get("epoch"),
            args.dataset,
        )
        support: dict[str, list[str]] = {}
        per_class = evaluate(
            predictor, datasets, args, args.visualize and path == files[-1], support
        )
        settings = to_mapping(model.config)
        meta = {
            "dataset": args.dataset,
            "model": model_name,
            "checkpoint": str(path),
            "epoch": payload.get("epoch"),
            "train_seed": (payload.get("config") or {}).get("seed"),
            **model.weight_sources,
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
