"""Time the pixel metrics of utils/metrics.py against the straightforward implementations.

Builds one synthetic class (smooth random maps, elliptic defects that raise the map, some
normal images) and prints a Markdown table: our split-sort AUPRO versus the MVTec full-argsort
recipe and the 200-step AnomalyCLIP variant, and our pixel_metrics versus sklearn.

    python benchmarks/metrics.py [--images 50] [--size 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.metrics import aupro, pixel_metrics  # noqa: E402


def synthetic_class(
    num_images: int, size: int, seed: int, normal_fraction: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """-> maps [N, S, S] float32, masks [N, S, S] bool (the first images are normal)."""
    rng = np.random.default_rng(seed)
    maps = np.empty((num_images, size, size), dtype=np.float32)
    masks = np.zeros((num_images, size, size), dtype=bool)
    rows, cols = np.mgrid[:size, :size]
    for i in range(num_images):
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=size / 64)
        maps[i] = noise / noise.std()
        if i < normal_fraction * num_images:
            continue
        for _ in range(rng.integers(1, 4)):
            center_r, center_c = rng.uniform(0, size, 2)
            radius_r, radius_c = rng.uniform(size / 40, size / 10, 2)
            distance = ((rows - center_r) / radius_r) ** 2 + ((cols - center_c) / radius_c) ** 2
            masks[i] |= distance <= 1
        maps[i] += 2.0 * ndimage.gaussian_filter(masks[i].astype(np.float32), sigma=size / 64)
    return maps, masks


def full_sort_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """MVTec AD official recipe (spec §7.2): argsort every pixel, cumsum, merge ties."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for i, mask in enumerate(masks):
        image_labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        labels[i] = np.where(image_labels > 0, image_labels + num_regions, 0)
        num_regions += count
    sizes = np.bincount(labels.ravel())
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    sorted_scores = maps.ravel()[order]
    sorted_labels = labels.ravel()[order]
    ok = sorted_labels == 0
    fpr = np.cumsum(ok) / ok.sum()
    pro = np.cumsum(np.where(ok, 0.0, 1.0 / (num_regions * sizes[sorted_labels])))
    ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), ok.size - 1)
    fpr = np.concatenate(([0.0], np.minimum(fpr[ends], 1.0), [1.0]))
    pro = np.concatenate(([0.0], np.minimum(pro[ends], 1.0), [1.0]))
    n = int(np.searchsorted(fpr, fpr_limit, side="right"))
    area = float(np.sum((fpr[1:n] - fpr[: n - 1]) * (pro[1:n] + pro[: n - 1])) / 2)
    if fpr[n - 1] < fpr_limit:
        slope = (pro[n] - pro[n - 1]) / (fpr[n] - fpr[n - 1])
        pro_limit = pro[n - 1] + slope * (fpr_limit - fpr[n - 1])
        area += 0.5 * (pro[n - 1] + pro_limit) * (fpr_limit - fpr[n - 1])
    return area / fpr_limit


def timed(function: Callable[[], float | dict]) -> tuple[float, float | dict]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50, help="test images in the class")
    parser.add_argument("--size", type=int, default=256, help="map side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    maps, masks = synthetic_class(args.images, args.size, args.seed)
    scores, labels = maps.ravel(), masks.ravel()
    rows: list[tuple[str, float, float, float, float]] = []

    ours_time, ours = timed(lambda: aupro(maps, masks))
    rows.append(("AUPRO@0.3 split sort (ours, exact)", ours_time, ours, 0.0, 1.0))
    for name, function in (
        ("AUPRO@0.3 full argsort (MVTec recipe)", lambda: full_sort_aupro(maps, masks)),
        ("AUPRO (200-step, anomalyclip)", lambda: aupro(maps, masks, variant="anomalyclip")),
    ):
        seconds, value = timed(function)
        rows.append((name, seconds, value, abs(value - ours), seconds / ours_time))

    all_time, all_four = timed(lambda: pixel_metrics(maps, masks))
    for name, key, sklearn_metric in (
        ("P-AUROC", "auroc", roc_auc_score),
        ("P-AP", "ap", average_precision_score),
    ):
        reference = all_four[key]
        rows.append((f"{name} pixel_metrics (ours, all four)", all_time, reference, 0.0, 1.0))
        seconds, value = timed(lambda metric=sklearn_metric: metric(labels, scores))
        rows.append(
            (
                f"{name} sklearn {sklearn_metric.__name__}",
                seconds,
                value,
                abs(value - reference),
                seconds / all_time,
            )
        )

    print(
        f"{args.images} images of {args.size}x{args.size} "
        f"({scores.size / 1e6:.1f} M pixels, {labels.mean():.2%} defect), seed {args.seed}\n"
    )
    print("| method | seconds | value | abs diff vs exact | time / ours |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds, value, diff, ratio in rows:
        print(f"| {name} | {seconds:.3f} | {value:.6f} | {diff:.2e} | {ratio:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
