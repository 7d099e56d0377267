"""Evaluate AA-CLIP checkpoints on a labelled data set, per class then the macro mean.

    python test.py --save_path ckpt/x --dataset MVTec            # image_adapter.pth
    python test.py --save_path ckpt/x --dataset MVTec --all_epochs
    python test.py --checkpoint ckpt/x/image_adapter_15.pth --dataset BTAD --metrics official

The protocol is the original's (spec aaclip.md §14): maps summed over levels, per-class min-max
of maps and detection scores, image score `0.5 * map max + 0.5 * det` (industrial) or the map max
(medical). The min-max is transductive: fine for paper tables, not for deployment (predict.py).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.anomaly import TestDataset, build_test_datasets
from datasets.catalog import default_data_root, get_dataset_info
from datasets.metadata import load_test_records
from datasets.synthetic import ensure_synthetic
from models.aaclip import AdaptedCLIP, build_aaclip, load_adapter
from train import build_parser as build_train_parser
from utils.config import (
    CONFIG_DIR,
    add_backbone_args,
    add_data_args,
    add_run_args,
    parse_with_config,
    parser_keys,
    resolve_backbone_defaults,
)
from utils.errors import CheckpointError, UserError
from utils.forward_utils import get_adapted_text_embedding
from utils.metrics import COLUMNS_FULL, COLUMNS_OFFICIAL, aaclip_image_scores, evaluate_class
from utils.report import format_table, write_results
from utils.runtime import autocast, resolve_device, seed_everything, setup_logging
from utils.visualize import save_panels

logger = logging.getLogger("test")

EPOCH_FILE = re.compile(r"image_adapter_(\d+)\.pth$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="aaclip", choices=("aaclip",))
    add_run_args(parser, "folder with text_adapter.pth and image_adapter*.pth; results go here")
    add_data_args(parser, "test data set (its full-shot records = its test split)")
    add_backbone_args(parser)
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="evaluate this image-adapter file (default: <save_path>/image_adapter.pth)",
    )
    group.add_argument(
        "--all_epochs",
        action="store_true",
        help="evaluate every image_adapter_<e>.pth in numeric epoch order",
    )
    group.add_argument("--test_batch_size", type=int, default=32)
    group.add_argument(
        "--amp",
        default="none",
        choices=("none", "bf16", "fp16"),
        help="autocast for the backbone; maps and metrics stay float32",
    )
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
        choices=("exact", "anomalyclip"),
        help="AUPRO as MVTec defines it, or AnomalyCLIP's 200-step approximation",
    )
    group.add_argument("--fpr_limit", type=float, default=0.3)
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
    training_keys = parser_keys(build_train_parser())
    args = parse_with_config(parser, argv, CONFIG_DIR / "aaclip.yaml", tolerated=training_keys)
    resolve_backbone_defaults(args)
    official = args.metrics == "official"
    if args.undefined_metric is None:
        args.undefined_metric = "zero" if official else "nan"
    if args.decimals is None:
        args.decimals = 2 if official else 1
    return args


def checkpoint_files(args: argparse.Namespace) -> list[Path]:
    """The image-adapter files to evaluate, in numeric epoch order for `--all_epochs`."""
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise CheckpointError(f"--checkpoint {args.checkpoint} does not exist")
        return [args.checkpoint]
    if args.all_epochs:
        files = [
            path
            for path in args.save_path.glob("image_adapter_*.pth")
            if EPOCH_FILE.search(path.name)
        ]
        if not files:
            raise CheckpointError(f"no image_adapter_<epoch>.pth in {args.save_path}; train first")
        return sorted(files, key=lambda path: int(EPOCH_FILE.search(path.name).group(1)))
    path = args.save_path / "image_adapter.pth"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; train first or pass --checkpoint FILE")
    return [path]


def load_text_adapter(model: AdaptedCLIP, args: argparse.Namespace) -> str:
    """Load `text_adapter.pth` from the checkpoint's folder; without one, plain CLIP anchors.

    The original silently falls back (`assert len(files) >= 0`, quirk 10); we warn and record it.
    """
    folder = args.checkpoint.parent if args.checkpoint is not None else args.save_path
    path = folder / "text_adapter.pth"
    if path.is_file():
        load_adapter(model, path, "text_adapter", vars(args))
        return str(path)
    logger.warning("no %s: text anchors come from plain CLIP (no stage 1)", path)
    model.use_text_adapter = False
    return "none (plain CLIP anchors)"


@torch.no_grad()
def predict_class(
    model: AdaptedCLIP, dataset: TestDataset, batch_size: int, device: torch.device, amp: str
) -> dict[str, np.ndarray | list]:
    """Raw maps `[n, S, S]`, detection scores `[n]`, masks `[n, S, S]`, labels `[n]` of a class."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    maps, scores, masks, labels, paths, file_names = [], [], [], [], [], []
    for batch in tqdm(loader, desc="batches", leave=False):
        with autocast(device, amp):
            output = model.predict(batch["image"].to(device), list(batch["class_name"]))
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
    model: AdaptedCLIP,
    datasets: dict[str, TestDataset],
    args: argparse.Namespace,
    device: torch.device,
    visualize: bool,
) -> dict[str, dict[str, float]]:
    """Per-class metrics for the loaded adapters."""
    domain = get_dataset_info(args.dataset).domain
    columns = COLUMNS_OFFICIAL if args.metrics == "official" else COLUMNS_FULL
    per_class = {}
    for class_name, dataset in tqdm(datasets.items(), desc="classes"):
        outputs = predict_class(model, dataset, args.test_batch_size, device, args.amp)
        image_scores = aaclip_image_scores(outputs["maps"], outputs["det_scores"], domain)
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
            write_panels(outputs, class_name, args)
    return per_class


def write_panels(outputs: dict, class_name: str, args: argparse.Namespace) -> None:
    """[image | ground truth | heat map] per image; the map min-max normalised over the class."""
    maps = outputs["maps"]
    low, high = float(maps.min()), float(maps.max())
    heat = (maps - low) / (high - low) if high > low else np.zeros_like(maps)
    folder = args.save_path / "visualization" / args.dataset / class_name
    for index, (path, file_name) in enumerate(
        zip(outputs["paths"], outputs["file_names"], strict=True)
    ):
        image = Image.open(path).convert("RGB")
        if args.vis_size == "model":
            image = image.resize((args.img_size, args.img_size), Image.BICUBIC)
        mask = outputs["masks"][index]
        if args.vis_size == "original":
            mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
        name = Path(file_name).with_suffix("").as_posix().replace("/", "_") + ".png"
        save_panels(folder / name, np.asarray(image), heat[index], mask=mask)


def results_stem(dataset: str, checkpoint: Path) -> str:
    return (
        f"results_{dataset}"
        if checkpoint.name == "image_adapter.pth"
        else f"results_{dataset}_{checkpoint.stem}"
    )


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    seed_everything(args.seed)
    info = get_dataset_info(args.dataset)
    if args.data_root is None:
        args.data_root = default_data_root(args.dataset)
    if args.dataset == "Synthetic":
        ensure_synthetic(args.data_root)
    files = checkpoint_files(args)
    model = build_aaclip(vars(args), device)
    model.domain = info.domain
    text_source = load_text_adapter(model, args)
    model.eval()
    with torch.no_grad():
        model.set_class_text_features(get_adapted_text_embedding(model, args.dataset, device))
    records = load_test_records(args.dataset, args.data_root, args.metadata_dir)
    datasets = build_test_datasets(records, args.data_root, args.img_size)
    columns = COLUMNS_OFFICIAL if args.metrics == "official" else COLUMNS_FULL
    out_dir = args.checkpoint.parent if args.checkpoint is not None else args.save_path
    for path in files:
        payload = load_adapter(model, path, "image_adapter", vars(args))
        logger.info("evaluating %s (epoch %s) on %s", path, payload.get("epoch"), args.dataset)
        per_class = evaluate(
            model, datasets, args, device, visualize=args.visualize and path == files[-1]
        )
        meta = {
            "dataset": args.dataset,
            "checkpoint": str(path),
            "epoch": payload.get("epoch"),
            "text_adapter": text_source,
            "resolution": args.img_size,
            "mask_resize": "nearest",
            "smoothing": "gaussian on the patch grid (AA-CLIP)",
            "pro_variant": args.pro_variant,
            "fpr_limit": args.fpr_limit,
            "undefined_metric": args.undefined_metric,
            "config": {
                key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()
            },
        }
        write_results(
            out_dir,
            results_stem(args.dataset, path),
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
    try:
        args = parse_args(argv)
        log_dir = args.checkpoint.parent if args.checkpoint is not None else args.save_path
        setup_logging(log_dir / "test.log", args.log_level)
        run(args)
    except UserError as error:
        logger.error("%s", str(error).strip().splitlines()[-1])
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
