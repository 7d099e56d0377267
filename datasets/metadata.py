"""jsonl records `{"image_path", "label", "class_name", "mask_path"}` (spec aaclip.md §12).

Paths are relative to the data set root; `mask_path` is "" for normal images. Every on-disk
layout has one builder into this format. The "full-shot" records are the data set's TEST split,
as in AA-CLIP (spec §12.2): AA-CLIP trains on one data set's test split and tests on another's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

from datasets.catalog import DatasetInfo, get_dataset_info
from utils.checkpoint import atomic_write
from utils.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif")  # matched case-insensitively
FULL_SHOT_FILE = "full-shot.jsonl"
TRAINING_MODES = ("few_shot", "full_shot")


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl file, normalised: int labels, `mask_path` "" when absent."""
    records = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                records.append(
                    {
                        "image_path": str(raw["image_path"]),
                        "label": int(float(raw["label"])),
                        "class_name": str(raw["class_name"]),
                        "mask_path": str(raw.get("mask_path") or ""),
                    }
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise DataError(
                    f"{path} line {line_number} is not a metadata record ({error!r}); "
                    "delete the file to rebuild it"
                ) from error
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records atomically (`utils.checkpoint.atomic_write`)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(Path(path), lambda file: file.write(text), mode="w")


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _record(root: Path, image: Path, label: int, class_name: str, mask: Path | None) -> dict:
    return {
        "image_path": image.relative_to(root).as_posix(),
        "label": label,
        "class_name": class_name,
        "mask_path": mask.relative_to(root).as_posix() if mask is not None else "",
    }


def _existing_mask(mask: Path, image: Path) -> Path:
    if not mask.is_file():
        raise DataError(f"anomalous image {image} has no mask {mask}; add the mask or remove it")
    return mask


def _present_classes(info: DatasetInfo, root: Path, pattern: str) -> list[str]:
    """Catalog classes with a `<class>/test` folder; warns about the others (partial downloads)."""
    present = [name for name in info.classes if (root / name / "test").is_dir()]
    if not present:
        raise DataError(f"{root} has no {info.name} layout: expected {pattern}; pass --data_root")
    for name in info.classes:
        if name not in present:
            logger.warning("%s: class folder %s missing, skipping it", info.name, root / name)
    return present


def _build_mvtec(info: DatasetInfo, root: Path) -> list[dict]:
    records = []
    for name in _present_classes(info, root, "<class>/test/good/*.png"):
        class_records = []
        for folder in sorted(path for path in (root / name / "test").iterdir() if path.is_dir()):
            for image in _images(folder):
                if folder.name == "good":
                    class_records.append(_record(root, image, 0, name, None))
                    continue
                mask = root / name / "ground_truth" / folder.name / f"{image.stem}_mask.png"
                class_records.append(_record(root, image, 1, name, _existing_mask(mask, image)))
        records += sorted(class_records, key=lambda record: record["image_path"])
    return records


def _build_btad(info: DatasetInfo, root: Path) -> list[dict]:
    records = []
    for name in _present_classes(info, root, "<class>/test/{ok,ko}/*.png"):
        test = root / name / "test"
        class_records = [_record(root, image, 0, name, None) for image in _images(test / "ok")]
        for image in _images(test / "ko"):
            mask = _existing_mask(root / name / "ground_truth" / "ko" / f"{image.stem}.png", image)
            class_records.append(_record(root, image, 1, name, mask))
        records += sorted(class_records, key=lambda record: record["image_path"])
    return records


def _build_visa(info: DatasetInfo, root: Path) -> list[dict]:
    split_csv = root / "split_csv" / "1cls.csv"
    if not split_csv.is_file():
        raise DataError(f"{root} has no VisA layout: expected {split_csv}; pass --data_root")
    with open(split_csv, encoding="utf-8-sig", newline="") as file:  # -sig strips a UTF-8 BOM
        reader = csv.DictReader(file)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{split_csv} lacks columns {sorted(missing)}; use VisA's 1cls.csv")
        rows = [row for row in reader if row["split"] == "test"]
    order = {name: index for index, name in enumerate(info.classes)}
    records = [
        {
            "image_path": row["image"],
            "label": int(row["label"] == "anomaly"),
            "class_name": row["object"],
            "mask_path": row["mask"] if row["label"] == "anomaly" else "",
        }
        for row in rows
    ]
    return sorted(records, key=lambda r: (order.get(r["class_name"], len(order)), r["image_path"]))


def _build_bmad(info: DatasetInfo, root: Path) -> list[dict]:
    test = root / "test"
    if not (test / "good" / "img").is_dir():
        raise DataError(
            f"{root} has no BMAD layout: expected test/good/img/*.png; pass --data_root"
        )
    name = info.classes[0]
    records = [_record(root, image, 0, name, None) for image in _images(test / "good" / "img")]
    for image in _images(test / "Ungood" / "img"):
        mask = _existing_mask(test / "Ungood" / "label" / image.name, image)
        records.append(_record(root, image, 1, name, mask))
    return sorted(records, key=lambda record: record["image_path"])


def _build_colon(info: DatasetInfo, root: Path) -> list[dict]:
    if not (root / "images").is_dir():
        raise DataError(f"{root} has no colon layout: expected images/*.png; pass --data_root")
    name = info.classes[0]
    return [
        _record(root, image, 1, name, _existing_mask(root / "masks" / image.name, image))
        for image in _images(root / "images")
    ]


_BUILDERS: dict[str, Callable[[DatasetInfo, Path], list[dict]]] = {
    "mvtec": _build_mvtec,
    "visa": _build_visa,
    "btad": _build_btad,
    "bmad": _build_bmad,
    "colon": _build_colon,
}


def build_records(dataset: str, root: Path) -> list[dict]:
    """Full-shot records (the test split on disk), in catalog class order then path order."""
    info = get_dataset_info(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist; pass --data_root or put the {dataset} data set there"
        )
    records = _BUILDERS[info.layout](info, root)
    if not records:
        raise DataError(f"{root} holds no {dataset} test images; pass --data_root")
    validate_records(dataset, root, records)
    return records


def validate_records(dataset: str, root: Path, records: list[dict]) -> None:
    """Unknown class -> `ConfigError`; image or mask missing under `root` -> `DataError`."""
    classes = get_dataset_info(dataset).classes
    for record in records:
        if record["class_name"] not in classes:
            raise ConfigError(
                f"class '{record['class_name']}' is not in {dataset}; "
                f"valid classes: {', '.join(classes)}"
            )
        for key in ("image_path", "mask_path"):
            if record[key] and not (root / record[key]).is_file():
                raise DataError(
                    f"{root / record[key]} is listed in the metadata but missing; "
                    "restore it or delete the jsonl file to rebuild it"
                )


def sample_k_shot(records: list[dict], k: int, seed: int) -> list[dict]:
    """k records per class: k // 2 normal and k - k // 2 anomalous (spec aaclip.md §12.3).

    Classes are visited in first-appearance order; candidates of each label are sorted by
    `image_path`, and one `random.Random(seed)` shared across classes draws
    `rng.sample(normals, k // 2)` then `rng.sample(anomalies, k - k // 2)`. The result is
    sorted by path within each class, so the same records and seed give the same file.
    """
    if k < 1:
        raise ConfigError(f"--shot {k} must be at least 1 (or 0 for full shot)")
    rng = random.Random(seed)
    by_class: dict[str, list[dict]] = {}
    for record in records:
        by_class.setdefault(record["class_name"], []).append(record)
    sampled = []
    for class_name, class_records in by_class.items():
        chosen = []
        for label, word, needed in ((0, "normal", k // 2), (1, "anomalous", k - k // 2)):
            candidates = sorted(
                (record for record in class_records if record["label"] == label),
                key=lambda record: record["image_path"],
            )
            if len(candidates) < needed:
                raise ConfigError(
                    f"--shot {k} needs {needed} {word} images of class '{class_name}' but it "
                    f"has {len(candidates)}; use a smaller --shot or --training_mode full_shot"
                )
            chosen += rng.sample(candidates, needed)
        sampled += sorted(chosen, key=lambda record: record["image_path"])
    return sampled


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _load_or_write(
    dataset: str, root: Path, path: Path, build: Callable[[], list[dict]]
) -> list[dict]:
    """Read `path` if present (validated), else build the records and write them there."""
    if path.is_file():
        records = read_jsonl(path)
        validate_records(dataset, root, records)
        logger.info("%s: using %s (sha256 %s)", dataset, path, _sha256(path))
        return records
    records = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records)
    except OSError as error:
        raise DataError(
            f"cannot write {path} ({error.strerror}); pass --metadata_dir to a writable folder"
        ) from error
    logger.info(
        "%s: wrote %d records to %s (sha256 %s)", dataset, len(records), path, _sha256(path)
    )
    return records


def load_test_records(dataset: str, root: Path, metadata_dir: Path | None = None) -> list[dict]:
    """The full-shot records from `<metadata_dir>/full-shot.jsonl`, built there if missing."""
    root = Path(root)
    folder = Path(metadata_dir) if metadata_dir is not None else root
    return _load_or_write(
        dataset, root, folder / FULL_SHOT_FILE, lambda: build_records(dataset, root)
    )


def ensure_training_records(
    dataset: str,
    root: Path,
    training_mode: str,
    shot: int,
    seed: int,
    metadata_dir: Path | None = None,
) -> list[dict]:
    """Training records: full shot, or `{shot}-shot.jsonl` sampled from it (`shot` 0 = full).

    An existing `{shot}-shot.jsonl` is reused whatever `seed` is; delete it to resample.
    """
    if training_mode not in TRAINING_MODES:
        raise ConfigError(
            f"--training_mode {training_mode} is unknown; choose one of {', '.join(TRAINING_MODES)}"
        )
    root = Path(root)
    folder = Path(metadata_dir) if metadata_dir is not None else root
    full = load_test_records(dataset, root, folder)
    if training_mode == "full_shot" or shot == 0:
        return full
    return _load_or_write(
        dataset, root, folder / f"{shot}-shot.jsonl", lambda: sample_k_shot(full, shot, seed)
    )
