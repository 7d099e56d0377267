"""The MVTec AD 2 benchmark server's submission tree: written image by image, then checked
against the data set's own listing before upload.

    DIR/anomaly_images/<class>/test_private/NNN_regular.tiff
    DIR/anomaly_images/<class>/test_private_mixed/NNN_mixed.tiff
    DIR/anomaly_images_thresholded/<class>/<split>/<stem>.png

for every class of the data set and nothing else: no test_public folder, no file at the root
(the publisher's checker refuses any other entry). A `.tiff` is the continuous map, float16 and
single-channel at the full resolution of its image (zlib-compressed: smooth maps shrink several
times; the publisher's tifffile reads it); the server computes AU-PRO from it. A `.png` is the
map binarised with the class's SegF1 threshold, uint8 with 0 normal and 255 defect; the server
computes SegF1 from it. Each file is written atomically (`utils.core.checkpoint.atomic_write`),
so an interrupted run leaves whole files only.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Set as AbstractSet
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from datasets.catalog import MVTEC_AD2_PRIVATE_SPLITS, mvtec_ad2_info
from datasets.metadata import build_records
from utils.core.checkpoint import atomic_write
from utils.core.errors import DataError

logger = logging.getLogger(__name__)

CONTINUOUS_FOLDER = "anomaly_images"
THRESHOLDED_FOLDER = "anomaly_images_thresholded"
_SUFFIXES = {CONTINUOUS_FOLDER: ".tiff", THRESHOLDED_FOLDER: ".png"}
_SHOWN = 3  # names listed in a message before "+N more"


def submission_paths(submission_dir: Path, image_path: str) -> tuple[Path, Path]:
    """(continuous .tiff, thresholded .png) of a private-split image; `image_path` is its
    record's path relative to the data root, `<class>/<split>/<file>`."""
    relative = PurePosixPath(image_path)
    if len(relative.parts) != 3 or relative.parts[1] not in MVTEC_AD2_PRIVATE_SPLITS:
        raise DataError(
            f"{image_path} is not an image of MVTec AD 2's {' or '.join(MVTEC_AD2_PRIVATE_SPLITS)}"
            " split; only those go into a submission"
        )
    return (
        Path(submission_dir) / CONTINUOUS_FOLDER / relative.with_suffix(".tiff"),
        Path(submission_dir) / THRESHOLDED_FOLDER / relative.with_suffix(".png"),
    )


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image file's header; the pixels are not decoded."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        raise DataError(f"{path} cannot be read as an image ({error}); restore it") from error


def write_anomaly_map(
    submission_dir: Path,
    data_root: Path,
    image_path: str,
    anomaly_map: Any,
    threshold: float,
) -> None:
    """Write one private-split image's map into the submission: the continuous map as float16
    and `anomaly_map > threshold` as 0/255.

    anomaly_map: [H, W] float, at the full resolution of the image `data_root / image_path`
    (checked against its header).
    """
    if hasattr(anomaly_map, "detach"):
        anomaly_map = anomaly_map.detach().cpu().float().numpy()
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    continuous_path, thresholded_path = submission_paths(submission_dir, image_path)
    width, height = _image_size(Path(data_root) / image_path)
    if anomaly_map.shape != (height, width):
        raise DataError(
            f"the map of {image_path} has shape {anomaly_map.shape} but its image is "
            f"{height} x {width} (H x W); write maps at the image's full resolution"
        )
    write_float16_tiff(continuous_path, anomaly_map, image_path)
    binary = np.where(anomaly_map > threshold, 255, 0).astype(np.uint8)
    atomic_write(thresholded_path, lambda file: Image.fromarray(binary).save(file, format="PNG"))


def write_float16_tiff(path: Path, anomaly_map: np.ndarray, image_path: str) -> None:
    """Write a map `[H, W]` as a single-channel float16 TIFF (zlib), atomically; `image_path`
    names its image in the error for a map float16 cannot hold."""
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
        half = np.asarray(anomaly_map, dtype=np.float32).astype(np.float16)
    if not np.isfinite(half).all():
        raise DataError(
            f"the map of {image_path} holds NaN or values beyond float16's range (65504); "
            "rescale the map before writing it"
        )
    encoded = io.BytesIO()  # tifffile wants a named file; the atomic write's is a bare handle
    tifffile.imwrite(encoded, half, compression="zlib")
    atomic_write(Path(path), lambda file: file.write(encoded.getbuffer()))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown} (+{len(names) - _SHOWN} more)"


def _check_entries(
    folder: Path,
    submission_dir: Path,
    folders: AbstractSet[str] = frozenset(),
    files: AbstractSet[str] = frozenset(),
) -> None:
    """`folder` holds exactly `folders` (as folders) and `files` (as files)."""
    where = folder.relative_to(submission_dir).as_posix()  # "." for the submission itself
    if not folder.is_dir():
        raise DataError(f"submission {submission_dir}: {where}/ is missing")
    entries = list(folder.iterdir())
    found_folders = {entry.name for entry in entries if entry.is_dir()}
    found_files = {entry.name for entry in entries if not entry.is_dir()}
    missing = sorted((folders - found_folders) | (files - found_files))
    extra = sorted((found_folders - folders) | (found_files - files))
    if missing:
        count = f" ({len(found_files & files)} of {len(files)} maps there)" if files else ""
        raise DataError(
            f"submission {submission_dir}: {where}/ lacks {_names(missing)}{count}; write the "
            "maps of every private-split image of the data set"
        )
    if extra:
        raise DataError(
            f"submission {submission_dir}: {where}/ holds {_names(extra)}, which the server "
            "refuses; remove them"
        )


def _private_listing(data_root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """class -> split -> file stem -> the image's path relative to the data root, for the
    private splits of the data set on disk."""
    listing: dict[str, dict[str, dict[str, str]]] = {}
    for split in MVTEC_AD2_PRIVATE_SPLITS:
        for record in build_records(mvtec_ad2_info(split), data_root):
            class_name, _, file_name = PurePosixPath(record["image_path"]).parts
            stems = listing.setdefault(class_name, {}).setdefault(split, {})
            stem = PurePosixPath(file_name).stem
            if stem in stems:
                raise DataError(
                    f"{stems[stem]} and {record['image_path']} share the stem {stem}, so their "
                    "maps would share a file; keep one of them"
                )
            stems[stem] = record["image_path"]
    missing = [name for name in mvtec_ad2_info().classes if name not in listing]
    if missing:
        logger.warning(
            "the data set lacks the classes %s: the benchmark server expects all of them",
            ", ".join(missing),
        )
    return listing


def _check_continuous(path: Path, size: tuple[int, int], submission_dir: Path) -> None:
    name = path.relative_to(submission_dir).as_posix()
    try:
        with tifffile.TiffFile(path) as tiff:  # the first page's tags only
            shape, dtype = tiff.pages[0].shape, tiff.pages[0].dtype
    except (tifffile.TiffFileError, OSError, ValueError) as error:
        raise DataError(
            f"submission {name} is not a readable TIFF ({error}); rewrite it"
        ) from error
    if dtype != np.float16:
        raise DataError(f"submission {name} is {dtype}, the server takes float16; rewrite it")
    if shape != size[::-1]:
        raise DataError(
            f"submission {name} has shape {shape} but its image is {size[1]} x {size[0]} "
            "(H x W); write maps at the image's full resolution"
        )


def _check_thresholded(path: Path, size: tuple[int, int], submission_dir: Path) -> None:
    name = path.relative_to(submission_dir).as_posix()
    try:
        with Image.open(path) as image:
            mode, found_size = image.mode, image.size
            values = np.unique(np.asarray(image)) if mode == "L" and found_size == size else None
    except OSError as error:
        raise DataError(f"submission {name} is not a readable PNG ({error}); rewrite it") from error
    if mode != "L":
        raise DataError(f"submission {name} is mode {mode}, the server takes uint8 gray (L)")
    if found_size != size:
        raise DataError(
            f"submission {name} is {found_size[1]} x {found_size[0]} but its image is "
            f"{size[1]} x {size[0]} (H x W); write maps at the image's full resolution"
        )
    if not np.isin(values, (0, 255)).all():
        raise DataError(f"submission {name} holds values other than 0 and 255; rewrite it")


def check_submission(submission_dir: Path, data_root: Path) -> int:
    """Check the tree against the data set's listing of its private splits: every class, the
    exact files of each class and split, each map's dtype (float16 / uint8, single channel), the
    thresholded maps' values (0/255), and each map's size equal to its image's (read from the
    image's header). -> the number of images checked; DataError (one line naming what is
    missing, extra or wrong) otherwise."""
    submission_dir = Path(submission_dir)
    listing = _private_listing(Path(data_root))
    _check_entries(submission_dir, submission_dir, folders=set(_SUFFIXES))
    for folder, suffix in _SUFFIXES.items():
        _check_entries(submission_dir / folder, submission_dir, folders=set(listing))
        for class_name, splits in listing.items():
            class_folder = submission_dir / folder / class_name
            _check_entries(class_folder, submission_dir, folders=set(MVTEC_AD2_PRIVATE_SPLITS))
            for split, stems in splits.items():
                files = {f"{stem}{suffix}" for stem in stems}
                _check_entries(class_folder / split, submission_dir, files=files)
    checked = 0
    for splits in listing.values():
        for stems in splits.values():
            for image_path in stems.values():
                size = _image_size(Path(data_root) / image_path)
                continuous, thresholded = submission_paths(submission_dir, image_path)
                _check_continuous(continuous, size, submission_dir)
                _check_thresholded(thresholded, size, submission_dir)
                checked += 1
    return checked
