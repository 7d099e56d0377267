"""Prints MVTec AD 2 tables: pixel metrics whole-image vs tiled, tiles/s and memory of an image.

    python benchmarks/mvtec_ad2.py                         # about 10 minutes on 2 CPU cores
    python benchmarks/mvtec_ad2.py --speed_model_name tiny --epochs 1   # a quick check

Quality: the miniature MVTec AD 2 tree (`datasets.synthetic_mvtec_ad2`: three classes of
1000-2232 px images with thin-line and spot defects) is generated into a temporary folder, and an
FE-CLIP on the tiny random backbone is trained for `--epochs` on its test_public split (native
crops of the model input, `--train_tile`). Each class is then predicted twice by test.py's own
loop functions: the whole image resized to the model input (the map resized back bilinearly
over the image, as `--submission` writes it without `--tile`) and tiled at the model input
with overlap 0.25 (`--tile`). Both are scored at the images' full resolution against the
full-resolution masks: pixel AUROC, AU-PRO to FPR 0.3 and 0.05, and SegF1 at the class's
threshold from its validation/good maps predicted the same way. The tiny backbone has random
weights and trains for seconds: the numbers compare the two inference modes of one model, not
a method's quality.

Speed: one 2448 x 2048 image (MVTec AD 2's largest) through AA-CLIP on `--speed_model_name`
(random weights; speed does not depend on them) at `--speed_size` px, fp32 on the CPU, whole
and tiled (tile = the model input, overlap 0.25). Each row runs in a child process; its peak
memory is that process's own peak RSS, VmHWM (torch, the model and the image included).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.anomaly import build_test_datasets  # noqa: E402
from datasets.catalog import mvtec_ad2_info, real_name  # noqa: E402
from datasets.items import collate_items  # noqa: E402
from datasets.metadata import build_records  # noqa: E402
from datasets.synthetic_mvtec_ad2 import generate  # noqa: E402
from datasets.tiling import TileConfig  # noqa: E402
from models.registry import load_trained_model, model_class  # noqa: E402
from utils.core.config import HelpFormatter  # noqa: E402
from utils.core.runtime import cpu_kind, peak_rss_bytes  # noqa: E402
from utils.engine import job as training_job  # noqa: E402
from utils.evaluation.evaluate import NormalMaps, predict_class  # noqa: E402
from utils.evaluation.metrics import ClassEvaluator, ValidationThreshold  # noqa: E402
from utils.inference.predictor import AnomalyPredictor  # noqa: E402
from utils.inference.resolution import NativePredictor, TiledPredictor  # noqa: E402

COLUMNS = ["P-AUROC", "AUPRO", "AUPRO@0.05", "SegF1"]
OVERLAP = 0.25
SPEED_IMAGE = (2448, 2048)  # width, height


def class_loader(dataset) -> DataLoader:
    """One native image per batch, as test.py's tiled path reads them."""
    return DataLoader(dataset, batch_size=1, collate_fn=collate_items)


def quality_rows(root: Path, checkpoint: Path) -> list[str]:
    """Per class and mode the full-resolution pixel metrics, then the means."""
    _, model, _ = load_trained_model(checkpoint)
    predictor = AnomalyPredictor(model)
    size = predictor.preprocessing.size
    modes = {
        "whole image": NativePredictor(predictor),
        f"tiled {size} px": TiledPredictor(predictor, TileConfig(size, OVERLAP), 32),
    }
    info = mvtec_ad2_info()
    preprocessing = predictor.preprocessing
    tests = build_test_datasets(build_records(info, root), root, preprocessing, native=True)
    normals = build_test_datasets(
        build_records(mvtec_ad2_info("validation"), root), root, preprocessing, native=True
    )
    lines = ["| class | inference | " + " | ".join(COLUMNS) + " | threshold |"]
    lines.append("|---|---|" + "---|" * (len(COLUMNS) + 1))
    means: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    for class_name, dataset in tests.items():
        prompt = real_name(info, class_name)
        for mode, scorer in modes.items():
            threshold = ValidationThreshold()
            predict_class(
                scorer, class_loader(normals[class_name]), prompt, NormalMaps(threshold), False
            )
            evaluator = ClassEvaluator(COLUMNS, seg_threshold=threshold.compute())
            predict_class(scorer, class_loader(dataset), prompt, evaluator, show_progress=False)
            values = evaluator.compute(None, None)
            means[mode].append([values[column] for column in COLUMNS])
            cells = " | ".join(f"{100 * values[column]:.1f}" for column in COLUMNS)
            lines.append(f"| {class_name} | {mode} | {cells} | {threshold.compute():.4g} |")
    for mode, rows in means.items():
        cells = " | ".join(f"{100 * value:.1f}" for value in np.nanmean(rows, axis=0))
        lines.append(f"| mean | {mode} | {cells} | |")
    return lines


def speed_row(args: dict, queue: multiprocessing.Queue) -> None:
    """One speed row in this (child) process: seconds, tiles and its peak RSS."""
    torch.set_num_threads(args["threads"])
    aaclip = model_class("aaclip")
    config = aaclip.config_class(
        model_name=args["model_name"], pretrained="", img_size=args["size"]
    )
    predictor = AnomalyPredictor(aaclip.from_config(config, "cpu"))
    rng = np.random.default_rng(0)
    width, height = SPEED_IMAGE
    pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(SPEED_IMAGE, Image.Resampling.BILINEAR)
    if args["tiled"]:
        tiling = TileConfig(args["size"], OVERLAP)
        scorer = TiledPredictor(predictor, tiling, args["batch_size"])
        tiles = len(scorer.tiler.positions(image))
        warm_up = image.crop((0, 0, args["size"], args["size"]))  # one tile: texts cached
    else:
        scorer, tiles, warm_up = NativePredictor(predictor), 1, image
    scorer.predict_image(warm_up, "can")
    start = time.perf_counter()
    output = scorer.predict_image(image, "can")
    seconds = time.perf_counter() - start
    assert output.anomaly_map.shape == (height, width)
    peak_gib = peak_rss_bytes() / 2**30  # this process's own (VmHWM)
    queue.put({"seconds": seconds, "tiles": tiles, "peak_gib": peak_gib})


def speed_rows(args: argparse.Namespace) -> list[str]:
    """Whole and tiled, each in a fresh child process."""
    context = multiprocessing.get_context("spawn")
    lines = [
        f"| {args.speed_model_name} @ {args.speed_size} px, fp32 | tiles | seconds | tiles/s "
        "| peak RSS GiB |",
        "|---|---|---|---|---|",
    ]
    for tiled in (False, True):
        queue = context.Queue()
        row = {
            "model_name": args.speed_model_name,
            "size": args.speed_size,
            "tiled": tiled,
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
        }
        process = context.Process(target=speed_row, args=(row, queue))
        process.start()
        result = queue.get()
        process.join()
        mode = f"tiled {args.speed_size} px, overlap {OVERLAP}" if tiled else "whole image"
        lines.append(
            f"| {mode} | {result['tiles']} | {result['seconds']:.2f} | "
            f"{result['tiles'] / result['seconds']:.2f} | {result['peak_gib']:.2f} |"
        )
    return lines


def cpu_model() -> str:
    """lscpu's model name (the platform's processor string where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def train_model(root: Path, work: Path, args: argparse.Namespace) -> Path:
    """FE-CLIP on the tiny backbone, trained on test_public; -> its run folder."""
    run = work / "run"
    argv = ["--model", "feclip", "--dataset", "MVTecAD2", "--data_root", str(root)]
    argv += ["--metadata_dir", str(work / "meta"), "--save_path", str(run), "--device", "cpu"]
    argv += ["--model_name", "tiny", "--img_size", str(args.img_size)]
    argv += ["--epochs", str(args.epochs), "--batch_size", "4", "--log_level", "WARNING"]
    if args.train_tile:
        argv += ["--train_tile", str(args.train_tile)]
    if training_job.main(argv) != 0:
        raise SystemExit("training the tiny FE-CLIP failed; see the log above")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--img_size", type=int, default=128, help="the tiny model's input side, and the tile side"
    )
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the tiny FE-CLIP")
    parser.add_argument(
        "--train_tile",
        type=int,
        default=None,
        help="training crops at native resolution of this side, 0 for whole images (default: "
        "the input side)",
    )
    parser.add_argument(
        "--speed_model_name",
        default="ViT-L-14-336",
        help="backbone of the speed table, or tiny for a quick check",
    )
    parser.add_argument(
        "--speed_size", type=int, default=336, help="the speed table's input side and tile side"
    )
    parser.add_argument(
        "--batch_size", type=int, default=8, help="tiles per forward in the speed table"
    )
    parser.add_argument("--skip_speed", action="store_true", help="print the quality table only")
    args = parser.parse_args(argv)
    if args.train_tile is None:
        args.train_tile = args.img_size
    torch.manual_seed(0)
    # the miniature tree holds 3 of the 8 classes; each record build would say so
    logging.getLogger("datasets.metadata").setLevel(logging.ERROR)
    header = [
        f"CPU: {cpu_model()} ({cpu_kind()}), {torch.get_num_threads()} threads",
        "",
        f"Miniature MVTec AD 2, tiny FE-CLIP at {args.img_size} px trained {args.epochs} epochs "
        f"(train_tile {args.train_tile}); metrics at full resolution, SegF1 at each class's "
        "validation/good threshold",
        "",
    ]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        root = generate(work / "MVTecAD2")
        run = train_model(root, work, args)
        print("\n".join(quality_rows(root, run)), flush=True)
    if not args.skip_speed:
        print(f"\nOne {SPEED_IMAGE[0]} x {SPEED_IMAGE[1]} image, AA-CLIP, random weights\n")
        print("\n".join(speed_rows(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
