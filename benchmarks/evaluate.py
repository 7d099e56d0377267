"""Prints the evaluation-path table: test.py's images/s and time per stage, workers off and on.

test.py's whole path in images/s and its share per stage (load, forward + maps, metrics,
files), on a generated MVTec-sized set, with the loader's workers off and on in one run.

    python benchmarks/evaluate.py                        # tiny backbone, CPU: the loading share
    python benchmarks/evaluate.py --save_path ckpt/x --device cuda --num_workers 8

The set is MVTec's shape: 15 classes with MVTec's names, 1,725 test images of 900 x 900 (1,258
anomalous, with masks), in MVTec's layout under `--root` (generated once, about 1 GB: smooth
textures with elliptical defects; PNG). Without `--save_path` an AA-CLIP on `--model_name`
(tiny by default; random weights: speed does not depend on them) is trained for one epoch per
stage on the synthetic set first.
Stages are timed by wrapping test.py's own calls: waiting for the DataLoader (decode, resize,
masks), `AnomalyPredictor.predict` (forward and maps), the streaming `ClassEvaluator` and the
paper image scores (metrics), `write_results` (files); the rest (metadata, model loading) is
"other".
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics import MVTEC_TEST  # noqa: E402  (MVTec AD's classes and test-split sizes)

from datasets.synthetic import ensure_synthetic  # noqa: E402
from utils.core.config import HelpFormatter  # noqa: E402
from utils.core.runtime import cpu_kind  # noqa: E402
from utils.engine import job  # noqa: E402
from utils.evaluation import evaluate as evaluation  # noqa: E402
from utils.evaluation.metrics import ClassEvaluator  # noqa: E402
from utils.inference.predictor import AnomalyPredictor  # noqa: E402

TRAIN_GOOD = 4  # the layout has a train split; test.py does not read it


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth RGB texture `[size, size, 3]` uint8 (compresses like a photo, not like noise)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    fx, fy, phase = rng.uniform(2, 9), rng.uniform(2, 9), rng.uniform(0, 6.3)
    base = 0.5 + 0.25 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    colour = rng.uniform(0.4, 1.0, size=3)
    return (np.clip(base[..., None] * colour, 0, 1) * 255).astype(np.uint8)


def write_class(root: Path, name: str, size: int, seed: int) -> None:
    """One class of the set: train/good, test/good, test/defect and its masks."""
    rng = np.random.default_rng(seed)
    total, good = MVTEC_TEST[name]
    anomalous = total - good
    for split, count in (("train/good", TRAIN_GOOD), ("test/good", good)):
        folder = root / name / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(texture(rng, size)).save(folder / f"{index:03d}.png", compress_level=1)
    images, masks = root / name / "test" / "defect", root / name / "ground_truth" / "defect"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size]
    for index in range(anomalous):
        picture = texture(rng, size)
        cy, cx = rng.uniform(0.2, 0.8, size=2) * size
        ry, rx = rng.uniform(0.03, 0.12, size=2) * size
        region = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        picture[region] = 255 - picture[region]
        Image.fromarray(picture).save(images / f"{index:03d}.png", compress_level=1)
        Image.fromarray(region.astype(np.uint8) * 255).save(
            masks / f"{index:03d}_mask.png", compress_level=1
        )


def generate(root: Path, size: int, seed: int = 0) -> Path:
    """Write the MVTec-shaped set under `root` unless it is complete (a class per process);
    returns root."""
    done = root / ".complete"
    if done.is_file():
        return root
    jobs = [(root, name, size, seed + index) for index, name in enumerate(MVTEC_TEST)]
    with multiprocessing.Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.starmap(write_class, jobs)
    done.write_text("ok\n")
    return root


class Stopwatch:
    """Seconds per stage, accumulated by wrapping callables and loader iterators."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        return timed

    def loader(self, base: type) -> type:
        watch = self

        class TimedLoader(base):
            def __iter__(self):
                iterator = super().__iter__()
                while True:
                    start = time.perf_counter()
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        return
                    finally:
                        watch.seconds["load"] += time.perf_counter() - start
                    yield batch

        return TimedLoader


def measure(config: evaluation.EvalConfig, workers: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of test.py's evaluation of `config` with `workers` loader workers, and per
    stage."""
    watch = Stopwatch()
    originals = {
        "DataLoader": evaluation.DataLoader,
        "write_results": evaluation.write_results,
    }
    methods = [
        (AnomalyPredictor, "predict", "forward + maps"),
        (AnomalyPredictor, "table_image_scores", "metrics"),
        (ClassEvaluator, "update", "metrics"),
        (ClassEvaluator, "compute", "metrics"),
    ]
    unwrapped = [getattr(owner, name) for owner, name, _ in methods]
    evaluation.DataLoader = watch.loader(originals["DataLoader"])
    evaluation.write_results = watch.wrap("files", originals["write_results"])
    for (owner, name, stage), method in zip(methods, unwrapped, strict=True):
        setattr(owner, name, watch.wrap(stage, method))
    try:
        start = time.perf_counter()
        evaluation.evaluate(dataclasses.replace(config, num_workers=workers), {})
        wall = time.perf_counter() - start
    finally:
        for name, value in originals.items():
            setattr(evaluation, name, value)
        for (owner, name, _), method in zip(methods, unwrapped, strict=True):
            setattr(owner, name, method)
    watch.seconds["other"] = wall - sum(watch.seconds.values())
    return wall, dict(watch.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("data/MVTecSized"),
        help="where the MVTec-sized set is generated once (about 1 GB) and reused",
    )
    parser.add_argument(
        "--size", type=int, default=900, help="image side in pixels of the generated set"
    )
    parser.add_argument(
        "--save_path",
        type=Path,
        default=None,
        help="a trained run to evaluate (default: train an AA-CLIP on --model_name for one "
        "epoch per stage first)",
    )
    parser.add_argument(
        "--model_name",
        default="tiny",
        help="backbone of the briefly trained AA-CLIP when no --save_path is given",
    )
    parser.add_argument(
        "--img_size",
        type=int,
        default=None,
        help="input side of the briefly trained AA-CLIP (default: its default for --model_name)",
    )
    parser.add_argument(
        "--device", default="cpu", help="device of training and evaluation: cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=2,
        help="DataLoader workers of the second row; the first row uses none",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per evaluation batch")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    root = generate(args.root, args.size)
    generated = time.perf_counter() - started
    count = sum(total for total, _ in MVTEC_TEST.values())
    with tempfile.TemporaryDirectory() as scratch:
        save_path = args.save_path
        if save_path is None:
            save_path = Path(scratch) / "run"
            synthetic = ensure_synthetic(Path("data/Synthetic"))
            quick = ["--data_root", str(synthetic), "--save_path", str(save_path), "--shot", "4"]
            quick += ["--text_epoch", "1", "--image_epoch", "1", "--device", args.device]
            quick += ["--model_name", args.model_name, "--pretrained", ""]  # random weights
            if args.img_size is not None:
                quick += ["--img_size", str(args.img_size)]
            if job.main(quick) != 0:
                raise SystemExit("training the tiny model failed; see its log above")
        config = evaluation.EvalConfig(
            save_path=save_path,
            dataset="MVTec",
            data_root=root,
            device=args.device,
            batch_size=args.batch_size,
            results_dir=Path(scratch) / "eval",
        )
        rows = [(workers, *measure(config, workers)) for workers in (0, args.num_workers)]

    print(
        f"\nEvaluation path: test.py on {count} images of {args.size} px in 15 classes "
        f"({root}, generated in {generated:.0f} s), {args.device}, batch {args.batch_size}; "
        f"CPU {cpu_kind()}, "
        f"{torch.get_num_threads()} threads\n"
    )
    stages = ("load", "forward + maps", "metrics", "files", "other")
    print("| workers | images/s | speed-up | " + " | ".join(stages) + " |")
    print("|---|---|---|" + "---|" * len(stages))
    for workers, wall, seconds in rows:
        shares = " | ".join(f"{seconds.get(s, 0.0):.1f} s ({seconds.get(s, 0.0) / wall:.0%})"
                            for s in stages)  # fmt: skip
        print(f"| {workers} | {count / wall:.1f} | {rows[0][1] / wall:.2f}x | {shares} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
