"""A small MVTec-layout data set with real masks, deterministic from a seed (tests, quick start).

Three classes (the `Synthetic` catalog entry), 96 x 96 RGB PNGs: per class `train/good` 8,
`test/good` 16, and `test/{blob,scratch}` 8 each with masks `ground_truth/<defect>/<stem>_mask.png`
(0/255) marking exactly the painted pixels. Blobs are ellipses and scratches 7-9 px thick lines,
each 3-15 % of the image, so a defect is visible on an 8 x 8 token grid at 64 px input.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.catalog import CATALOG
from utils.core.checkpoint import check_creatable
from utils.core.errors import DataError, StorageError, UserError

logger = logging.getLogger(__name__)

SIZE = 96
NUM_TRAIN_GOOD = 8
NUM_TEST_GOOD = 16
NUM_PER_DEFECT = 8
DEFECTS = ("blob", "scratch")
COMPLETE_MARKER = ".complete"  # written last: a folder without it is an interrupted generation

_ROWS, _COLS = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _tile(rng: np.random.Generator) -> np.ndarray:
    """Gray tile: a smooth gradient in a random direction plus fine noise. -> [H, W, 3]"""
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * _COLS + np.sin(angle) * _ROWS) / SIZE  # about [-1.4, 1.4]
    gray = 128 + 25 * ramp + rng.normal(0, 6, (SIZE, SIZE))
    return np.repeat(gray[..., None], 3, axis=2) + np.array([0, 2, 6])


def _stripes(rng: np.random.Generator) -> np.ndarray:
    """Vertical pink/beige stripes, period 12 px, random phase. -> [H, W, 3]"""
    phase = rng.uniform(0, 12)
    on = (((_COLS + phase) % 12) < 6)[..., None]
    image = np.where(on, np.array([190, 150, 150]), np.array([225, 205, 175]))
    return image + rng.normal(0, 5, (SIZE, SIZE, 1))


def _dots(rng: np.random.Generator) -> np.ndarray:
    """Blue dots of radius 3 on a 16 px grid with a random offset, light background."""
    offset_row, offset_col = rng.uniform(0, 16, size=2)
    distance = np.hypot((_ROWS + offset_row) % 16 - 8, (_COLS + offset_col) % 16 - 8)
    on = (distance < 3)[..., None]
    image = np.where(on, np.array([40, 60, 150]), np.array([200, 210, 220]))
    return image + rng.normal(0, 4, (SIZE, SIZE, 1))


_TEXTURES = {"tile": _tile, "stripes": _stripes, "dots": _dots}
assert tuple(_TEXTURES) == CATALOG["Synthetic"].classes


def _blob_region(rng: np.random.Generator) -> np.ndarray:
    """A random rotated ellipse, semi-axes 10-18 px (3.4-11 % of the image). -> [H, W] bool"""
    center_row, center_col = rng.uniform(20, SIZE - 20, size=2)
    semi_a, semi_b = rng.uniform(10, 18, size=2)
    angle = rng.uniform(0, np.pi)
    d_row, d_col = _ROWS - center_row, _COLS - center_col
    u = np.cos(angle) * d_col + np.sin(angle) * d_row
    v = -np.sin(angle) * d_col + np.cos(angle) * d_row
    return (u / semi_a) ** 2 + (v / semi_b) ** 2 <= 1


def _scratch_region(rng: np.random.Generator) -> np.ndarray:
    """A straight line 45-80 px long and 7-9 px thick (3-8 % of the image). -> [H, W] bool"""
    length = rng.uniform(45, 80)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])  # (row, col)
    center = rng.uniform(SIZE / 2 - 12, SIZE / 2 + 12, size=2)
    start = center - direction * length / 2
    d_row, d_col = _ROWS - start[0], _COLS - start[1]
    along = np.clip(d_row * direction[0] + d_col * direction[1], 0, length)
    distance = np.hypot(d_row - along * direction[0], d_col - along * direction[1])
    return distance <= rng.uniform(3.5, 4.5)


def _defect(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Region [H, W] bool and its paint colour [3]: a dark or bright blob, a red scratch."""
    if kind == "blob":
        color = np.array([20, 20, 20]) if rng.random() < 0.5 else np.array([250, 250, 235])
        return _blob_region(rng), color
    return _scratch_region(rng), np.array([200, 30, 30])


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8)).save(path)


def _write_class(
    folder: Path, texture: Callable[[np.random.Generator], np.ndarray], rng: np.random.Generator
) -> None:
    for index in range(NUM_TRAIN_GOOD):
        _save(texture(rng), folder / "train" / "good" / f"{index:03d}.png")
    for index in range(NUM_TEST_GOOD):
        _save(texture(rng), folder / "test" / "good" / f"{index:03d}.png")
    for kind in DEFECTS:
        for index in range(NUM_PER_DEFECT):
            image = texture(rng)
            region, color = _defect(kind, rng)
            image[region] = color
            _save(image, folder / "test" / kind / f"{index:03d}.png")
            _save(region * 255.0, folder / "ground_truth" / kind / f"{index:03d}_mask.png")


def is_complete(root: Path) -> bool:
    """Whether `root` holds a fully written synthetic data set."""
    return (Path(root) / COMPLETE_MARKER).is_file()


def write_whole(
    root: Path,
    what: str,
    write: Callable[[Path, np.random.Generator], None],
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """A generated data set at `root`: `write(folder, rng)` fills a temporary folder that is
    marked complete and renamed into place, so a killed run never leaves half a data set. A
    complete one is kept unless `overwrite`; another non-empty folder is refused (`what` names
    the data set in that message)."""
    root = Path(root)
    if is_complete(root) and not overwrite:
        return root
    if root.exists() and not overwrite and any(root.iterdir()):
        raise DataError(
            f"{root} exists but holds no complete {what}; pass --overwrite or choose another --root"
        )
    tmp_root = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_root, ignore_errors=True)
    try:
        tmp_root.mkdir(parents=True)
        write(tmp_root, np.random.default_rng(seed))
        (tmp_root / COMPLETE_MARKER).write_text(f"seed {seed}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp_root, root)
    except OSError as error:  # a read-only folder, a full disk
        shutil.rmtree(tmp_root, ignore_errors=True)
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise StorageError(
            f"cannot write the {what} to {root} ({reason}); choose a writable folder "
            "(--data_root, or the generator's --root)"
        ) from error
    return root


def generate(root: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the data set to `root` (in a temporary folder, renamed when done) and return it."""

    def write(folder: Path, rng: np.random.Generator) -> None:
        for class_name, texture in _TEXTURES.items():
            _write_class(folder / class_name, texture, rng)

    return write_whole(root, "synthetic data set", write, seed, overwrite)


def check_generatable(root: Path) -> None:
    """Before any work: a synthetic data set still to generate at `root` can be written there
    (the folder above it takes the temporary folder it is written in), else one line naming
    --data_root; nothing is created."""
    if not is_complete(root):
        check_creatable(root, "--data_root")


def ensure_synthetic(root: Path) -> Path:
    """Generate the synthetic data set at `root` on first use (seed 0); return `root`."""
    if not is_complete(root):
        logger.info("generating the synthetic data set in %s", root)
        generate(root)
    return Path(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    args = parser.parse_args(argv)
    try:
        root = generate(args.root, seed=args.seed, overwrite=args.overwrite)
    except UserError as error:
        logger.error("%s", error)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
