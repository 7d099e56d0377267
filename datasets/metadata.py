"""jsonl records `{"image_path", "label", "class_name", "mask_path"}` (AA-CLIP's metadata files).

Paths are relative to the data set root; `mask_path` is "" for normal images. Every on-disk
layout has one builder into this format. The "full-shot" records are the data set's TEST split,
as in AA-CLIP's shipped `dataset/metadata/<Dataset>/full-shot.jsonl`: AA-CLIP trains on one data
set's test split and tests on another's.
MVTec AD 2's private test splits are records with label UNLABELLED (-1): they are predicted for
the benchmark server and never trained on, sampled or scored (`require_labelled`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from datasets.catalog import MVTEC_AD2_PRIVATE_SPLITS, DatasetInfo, get_dataset_info
from utils.core.checkpoint import atomic_write
from utils.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # any case
FULL_SHOT_FILE = "full-shot.jsonl"
TRAINING_MODES = ("few_shot", "full_shot")
# The label of an image whose label the publisher withholds (MVTec AD 2's test_private and
# test_private_mixed): an int, so jsonl files and the test loader's int64 labels take it.
UNLABELLED = -1


LABELS = (0, 1)
# The records files whose records may be UNLABELLED: MVTec AD 2's private splits (records_file).
UNLABELLED_FILES = tuple(f"{split}.jsonl" for split in MVTEC_AD2_PRIVATE_SPLITS)


def _record_of(raw: object, labels: tuple[int, ...]) -> dict:
    """A normalised record (int label, `mask_path` "" when absent or null) of a parsed jsonl
    line; ValueError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"a {type(raw).__name__}, not an object")
    missing = [key for key in ("image_path", "label", "class_name") if key not in raw]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    for key in ("image_path", "class_name"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ValueError(f"{key} {raw[key]!r} is not a non-empty string")
    mask = raw.get("mask_path") or ""
    if not isinstance(mask, str):
        raise ValueError(f"mask_path {mask!r} is not a string")
    label = raw["label"]
    # the originals write 1.0 / 0.0; a bool or a fraction is no label
    if isinstance(label, bool) or not isinstance(label, int | float) or label not in labels:
        raise ValueError(f"label {label!r} is not one of {', '.join(map(str, labels))}")
    return {
        "image_path": raw["image_path"],
        "label": int(label),
        "class_name": raw["class_name"],
        "mask_path": mask,
    }


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl file, each checked and normalised (`_record_of`): keys and types,
    label 0 or 1 (or UNLABELLED in an UNLABELLED_FILES file), each image once. A bad line or
    a duplicate raises DataError naming the file and the line(s)."""
    path = Path(path)
    labels = (*LABELS, UNLABELLED) if path.name in UNLABELLED_FILES else LABELS
    records = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as file:
        try:
            lines = list(file)
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text; delete the file to rebuild it") from error
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = _record_of(json.loads(line), labels)
        except ValueError as error:  # json.JSONDecodeError is one
            raise DataError(
                f"{path} line {line_number} is not a metadata record ({error}); fix the line or "
                "delete the file to rebuild it"
            ) from error
        image = record["image_path"]
        if image in first_line:
            raise DataError(
                f"{path} lists {image} twice (lines {first_line[image]} and {line_number}); "
                "delete one of the lines"
            )
        first_line[image] = line_number
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records atomically (`utils.core.checkpoint.atomic_write`)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(Path(path), lambda file: file.write(text), mode="w")


def _images(folder: Path) -> list[Path]:
    """Image files of a folder (any of IMAGE_EXTENSIONS, in any case), sorted."""
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


class _Masks:
    """The masks of a folder found by their image's stem, whatever their extension and case
    (BTAD's class 03 ships .bmp masks, classes 01 and 02 .png masks, some for .bmp images)."""

    def __init__(self, folder: Path, suffix: str = "") -> None:
        self.folder = folder
        self.suffix = suffix
        self.by_stem = {path.stem.lower(): path for path in _images(folder)}

    def find(self, image: Path) -> Path | None:
        return self.by_stem.get(f"{image.stem}{self.suffix}".lower())

    def of(self, image: Path) -> Path:
        """The mask of an anomalous image; a missing one is a one-line error."""
        mask = self.find(image)
        if mask is None:
            expected = self.folder / f"{image.stem}{self.suffix}.png"
            raise DataError(
                f"anomalous image {image} has no mask {expected} (any image extension); "
                "add the mask or remove the image"
            )
        return mask


def _sorted(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda record: record["image_path"])


def _present_classes(info: DatasetInfo, root: Path, pattern: str, test: str = "test") -> list[str]:
    """Catalog classes with a `<class>/<test>` folder; warns about the others (a partial
    download)."""
    present = [name for name in info.classes if (root / name / test).is_dir()]
    if not present:
        raise DataError(f"{root} has no {info.name} layout: expected {pattern}; pass --data_root")
    for name in info.classes:
        if name not in present:
            logger.warning("%s: class folder %s missing, skipping it", info.name, root / name)
    return present


def _build_mvtec(info: DatasetInfo, root: Path) -> list[dict]:
    """MVTec AD, MPDD, DTD-Synthetic: `<class>/test/<defect>/*`, masks
    `<class>/ground_truth/<defect>/<stem>_mask.*`; `train/`, licences and readmes are not
    records."""
    records = []
    for name in _present_classes(info, root, "<class>/test/good/*.png"):
        class_records = []
        for folder in sorted(path for path in (root / name / "test").iterdir() if path.is_dir()):
            masks = _Masks(root / name / "ground_truth" / folder.name, "_mask")
            for image in _images(folder):
                if folder.name == "good":
                    class_records.append(_record(root, image, 0, name, None))
                else:
                    class_records.append(_record(root, image, 1, name, masks.of(image)))
        records += _sorted(class_records)
    return records


def _build_btad(info: DatasetInfo, root: Path) -> list[dict]:
    """BTAD (BTech_Dataset_transformed): `<class>/test/{ok,ko}/*`, masks
    `<class>/ground_truth/ko/<stem>.*` (.png for 01/02, .bmp for 03)."""
    records = []
    for name in _present_classes(info, root, "<class>/test/{ok,ko}/*.bmp"):
        test = root / name / "test"
        masks = _Masks(root / name / "ground_truth" / "ko")
        class_records = [_record(root, image, 0, name, None) for image in _images(test / "ok")]
        class_records += [
            _record(root, image, 1, name, masks.of(image)) for image in _images(test / "ko")
        ]
        records += _sorted(class_records)
    return records


def _build_visa(info: DatasetInfo, root: Path) -> list[dict]:
    """VisA: the test rows of `split_csv/1cls.csv` (its train rows are not records)."""
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
    """BMAD (Brain, Liver, Retina): `test/good/img/*`, `test/Ungood/img/*`, masks
    `test/Ungood/label/<stem>.*`; `train/` and `valid/` are not records."""
    test = root / "test"
    if not (test / "good" / "img").is_dir():
        raise DataError(
            f"{root} has no BMAD layout: expected test/good/img/*.png; pass --data_root"
        )
    name = info.classes[0]
    masks = _Masks(test / "Ungood" / "label")
    records = [_record(root, image, 0, name, None) for image in _images(test / "good" / "img")]
    records += [
        _record(root, image, 1, name, masks.of(image)) for image in _images(test / "Ungood" / "img")
    ]
    return _sorted(records)


def _build_colon(info: DatasetInfo, root: Path) -> list[dict]:
    """The colonoscopy sets (PraNet's TestDataset folders): `images/*`, `masks/<stem>.*`, all
    anomalous."""
    if not (root / "images").is_dir():
        raise DataError(f"{root} has no colon layout: expected images/*.png; pass --data_root")
    name = info.classes[0]
    masks = _Masks(root / "masks")
    return [_record(root, image, 1, name, masks.of(image)) for image in _images(root / "images")]


def dagm_defective(labels: Path) -> dict[str, str]:
    """DAGM 2007's `Label/Labels.txt`: a first line `1`, then one row per image
    `<n> <defective 0/1> <image file> 0 <label file or 0>` -> {image file: label file} for the
    defective rows (the others are defect-free images)."""
    defective = {}
    for line in labels.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and fields[1] == "1":
            defective[fields[2].lower()] = fields[4]
    return defective


def _build_dagm(info: DatasetInfo, root: Path) -> list[dict]:
    """DAGM 2007: `Class<n>/Test/*.PNG`; `Test/Label/Labels.txt` says which are defective and
    names their label image in `Test/Label/` (weak, elliptic labels). `Train/` is not records."""
    records = []
    for name in _present_classes(info, root, "Class<n>/Test/*.PNG", test="Test"):
        test = root / name / "Test"
        labels = test / "Label" / "Labels.txt"
        if not labels.is_file():
            raise DataError(f"{labels} is missing: DAGM lists its defective images there")
        defective = dagm_defective(labels)
        masks = {path.name.lower(): path for path in _images(test / "Label")}
        class_records = []
        for image in _images(test):
            label_file = defective.get(image.name.lower())
            if label_file is None:
                class_records.append(_record(root, image, 0, name, None))
                continue
            mask = masks.get(label_file.lower())
            if mask is None:
                raise DataError(f"{labels} names {label_file} for {image.name}, which is missing")
            class_records.append(_record(root, image, 1, name, mask))
        records += _sorted(class_records)
    return records


def _build_yes_no(info: DatasetInfo, root: Path) -> list[dict]:
    """BrainMRI and Br35H (Kaggle): `yes/*` tumour (anomalous), `no/*` normal, image labels only;
    Br35H's unlabelled `pred/` and BrainMRI's duplicate `brain_tumor_dataset/` are not records."""
    if not (root / "yes").is_dir() or not (root / "no").is_dir():
        raise DataError(f"{root} has no {info.name} layout: expected yes/*.jpg and no/*.jpg")
    name = info.classes[0]
    records = [_record(root, image, 0, name, None) for image in _images(root / "no")]
    records += [_record(root, image, 1, name, None) for image in _images(root / "yes")]
    return _sorted(records)


def _build_headct(info: DatasetInfo, root: Path) -> list[dict]:
    """Head CT - hemorrhage (Kaggle): `head_ct/head_ct/<id>.png` and `labels.csv` (`id,
    hemorrhage`), image labels only."""
    table, folder = root / "labels.csv", root / "head_ct" / "head_ct"
    if not table.is_file() or not folder.is_dir():
        raise DataError(f"{root} has no HeadCT layout: expected labels.csv and head_ct/head_ct/")
    with open(table, encoding="utf-8-sig", newline="") as file:
        rows = list(csv.DictReader(file, skipinitialspace=True))
    images = {path.stem: path for path in _images(folder)}
    name = info.classes[0]
    records = []
    for row in rows:
        image = images.get(f"{int(row['id']):03d}") or images.get(str(row["id"]))
        if image is None:
            raise DataError(f"{table} lists image {row['id']}, which is not in {folder}")
        records.append(_record(root, image, int(row["hemorrhage"]), name, None))
    return _sorted(records)


def _build_isic(info: DatasetInfo, root: Path) -> list[dict]:
    """ISIC 2016 (ISBI challenge, part 1 test): `ISBI2016_ISIC_Part1_Test_Data/*.jpg`, masks
    `ISBI2016_ISIC_Part1_Test_GroundTruth/<stem>_Segmentation.png`, all anomalous."""
    images = root / "ISBI2016_ISIC_Part1_Test_Data"
    if not images.is_dir():
        raise DataError(f"{root} has no ISIC layout: expected {images.name}/*.jpg")
    masks = _Masks(root / "ISBI2016_ISIC_Part1_Test_GroundTruth", "_Segmentation")
    name = info.classes[0]
    return [_record(root, image, 1, name, masks.of(image)) for image in _images(images)]


def _build_folder(info: DatasetInfo, root: Path) -> list[dict]:
    """Your own images (anomalib's Folder convention): `<normal_dir>/*` normal, `<abnormal_dir>/*`
    anomalous, masks in `<mask_dir>` by the image's stem (or `<stem>_mask`), optional; or a CSV
    `image,label,mask` (paths relative to the data root, mask may be empty)."""
    options = dict(info.options)
    name = info.classes[0]
    if options.get("records_csv"):
        table = root / options["records_csv"]
        if not table.is_file():
            raise DataError(f"--records_csv {table} does not exist")
        with open(table, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file)
            if not {"image", "label"} <= set(reader.fieldnames or ()):
                raise DataError(f"{table} needs a header with columns image,label[,mask]")
            rows = list(reader)
        for row_number, row in enumerate(rows, start=2):
            if (row["label"] or "").strip() not in ("0", "1"):
                raise DataError(f"{table} line {row_number}: label {row['label']!r} is not 0 or 1")
        return [
            {
                "image_path": Path(row["image"]).as_posix(),
                "label": int(row["label"]),
                "class_name": name,
                "mask_path": Path(row["mask"]).as_posix() if row.get("mask") else "",
            }
            for row in rows
        ]
    normal, abnormal = root / options["normal_dir"], root / options["abnormal_dir"]
    for flag, folder in (("--normal_dir", normal), ("--abnormal_dir", abnormal)):
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder} is a file, not a folder of images; pass {flag} a folder")
    if not _images(normal) and not _images(abnormal):
        raise DataError(
            f"{root} has no images in {normal.name}/ or {abnormal.name}/; pass --normal_dir, "
            "--abnormal_dir (folders under --data_root) or --records_csv"
        )
    by_stem = _Masks(root / options["mask_dir"])
    suffixed = _Masks(root / options["mask_dir"], "_mask")
    records = [_record(root, image, 0, name, None) for image in _images(normal)]
    for image in _images(abnormal):
        mask = by_stem.find(image) or suffixed.find(image)
        records.append(_record(root, image, 1, name, mask))
    return _sorted(records)


def _build_mvtec_ad2(info: DatasetInfo, root: Path) -> list[dict]:
    """MVTec AD 2, the split of `info.options`: test_public `<class>/test_public/{good,bad}/*`,
    masks `test_public/ground_truth/bad/<stem>_mask.*` (good and bad reuse stems: a record is
    its path, never its stem); validation `<class>/validation/good/*`, all normal; test_private
    and test_private_mixed `<class>/<split>/*`, UNLABELLED and without masks. `train/` and the
    root's license.txt and readme.txt are not records."""
    split = dict(info.options)["split"]
    present = [name for name in info.classes if (root / name).is_dir()]
    if not present:
        raise DataError(
            f"{root} has no {info.name} layout: expected <class>/{split}/ for the classes "
            f"{', '.join(info.classes)}; pass --data_root"
        )
    for name in info.classes:
        if name not in present:
            logger.warning("%s: class folder %s missing, skipping it", info.name, root / name)
    records = []
    for name in present:
        folder = root / name / split
        if split in MVTEC_AD2_PRIVATE_SPLITS:
            class_records = [
                _record(root, image, UNLABELLED, name, None) for image in _images(folder)
            ]
        else:
            class_records = [
                _record(root, image, 0, name, None) for image in _images(folder / "good")
            ]
        if split == "test_public":
            masks = _Masks(folder / "ground_truth" / "bad", "_mask")
            class_records += [
                _record(root, image, 1, name, masks.of(image)) for image in _images(folder / "bad")
            ]
        if not class_records:
            raise DataError(
                f"{folder} holds no images; restore {name}'s {split} split from the MVTec AD 2 "
                "download or pass --data_root"
            )
        records += _sorted(class_records)
    return records


_BUILDERS: dict[str, Callable[[DatasetInfo, Path], list[dict]]] = {
    "mvtec": _build_mvtec,
    "visa": _build_visa,
    "btad": _build_btad,
    "bmad": _build_bmad,
    "colon": _build_colon,
    "dagm": _build_dagm,
    "yes_no": _build_yes_no,
    "headct": _build_headct,
    "isic": _build_isic,
    "folder": _build_folder,
    "mvtec_ad2": _build_mvtec_ad2,
}


def build_records(dataset: str | DatasetInfo, root: Path) -> list[dict]:
    """Full-shot records (the test split on disk), in catalog class order then path order.
    `dataset`: a catalog name, or a `DatasetInfo` (a run's Folder set)."""
    info = get_dataset_info(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist; pass --data_root or put the {info.name} data set "
            "there"
        )
    records = _BUILDERS[info.layout](info, root)
    if not records:
        raise DataError(f"{root} holds no {info.name} test images; pass --data_root")
    validate_records(info, root, records)
    return records


def validate_records(dataset: str | DatasetInfo, root: Path, records: list[dict]) -> None:
    """Unknown class -> `ConfigError`; image or mask missing under `root`, or (unless the data
    set's `allow_outside_root`) resolving outside it (`..`, absolute, a symlink out) ->
    `DataError`."""
    info = get_dataset_info(dataset)
    classes = info.classes
    resolved_root = Path(root).resolve()
    for record in records:
        if record["class_name"] not in classes:
            raise ConfigError(
                f"class '{record['class_name']}' is not in {info.name}; "
                f"valid classes: {', '.join(classes)}"
            )
        for key in ("image_path", "mask_path"):
            if record[key] and not info.allow_outside_root:
                target = (root / record[key]).resolve()
                if not target.is_relative_to(resolved_root):
                    raise DataError(
                        f"the {key} {record[key]} resolves to {target}, outside the data root "
                        f"{root}; move it under the root or pass --allow_outside_root"
                    )
            if record[key] and not (root / record[key]).is_file():
                raise DataError(
                    f"{root / record[key]} is listed in the metadata but missing; "
                    "restore it or delete the jsonl file to rebuild it"
                )


def log_resized_masks(records: list[dict], root: Path) -> int:
    """Count (and log) the masks whose size differs from their image's, which `--resize_masks`
    resizes to the model input as the original code does; reads image headers only."""
    root = Path(root)
    resized = 0
    for record in records:
        if record["mask_path"]:
            with Image.open(root / record["image_path"]) as image:
                with Image.open(root / record["mask_path"]) as mask:
                    resized += image.size != mask.size
    if resized:
        logger.warning(
            "--resize_masks: %d of %d masks differ in size from their image and are resized",
            resized,
            sum(1 for record in records if record["mask_path"]),
        )
    return resized


def require_labelled(records: list[dict], purpose: str) -> None:
    """Refuse records of an unlabelled split (MVTec AD 2's private test splits) for `purpose`
    (training, k-shot sampling, a threshold): one-line ConfigError naming the first one."""
    unlabelled = [record for record in records if record["label"] == UNLABELLED]
    if unlabelled:
        raise ConfigError(
            f"{purpose} needs labelled images, but {len(unlabelled)} records are of an unlabelled "
            f"split (e.g. {unlabelled[0]['image_path']}); use --split test_public, or validation "
            "for thresholds"
        )


def sample_k_shot(records: list[dict], k: int, seed: int) -> list[dict]:
    """k records per class: k // 2 normal and k - k // 2 anomalous (AA-CLIP's k-shot, as its
    authors define it in Mwxinnn/AA-CLIP issues #8 and #51).

    Classes are visited in first-appearance order; candidates of each label are sorted by
    `image_path`, and one `random.Random(seed)` shared across classes draws
    `rng.sample(normals, k // 2)` then `rng.sample(anomalies, k - k // 2)`. The result is
    sorted by path within each class, so the same records and seed give the same file.
    """
    if k < 1:
        raise ConfigError(f"--shot {k} must be at least 1 (or 0 for full shot)")
    require_labelled(records, f"--shot {k} sampling")
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
    dataset: str | DatasetInfo, root: Path, path: Path, build: Callable[[], list[dict]]
) -> list[dict]:
    """Read `path` if present (validated), else build the records and write them there."""
    name = get_dataset_info(dataset).name
    if path.is_file():
        records = read_jsonl(path)
        validate_records(dataset, root, records)
        logger.info("%s: using %s (sha256 %s)", name, path, _sha256(path))
        return records
    records = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records)
    except OSError as error:
        raise DataError(
            f"cannot write {path} ({error.strerror}); pass --metadata_dir to a writable folder"
        ) from error
    logger.info("%s: wrote %d records to %s (sha256 %s)", name, len(records), path, _sha256(path))
    return records


def records_file(dataset: str | DatasetInfo) -> str:
    """The jsonl file name of a data set's test records: full-shot.jsonl, or `<split>.jsonl`
    for an MVTec AD 2 split other than test_public (each split keeps its own file)."""
    info = get_dataset_info(dataset)
    split = dict(info.options).get("split")
    if info.layout == "mvtec_ad2" and split != "test_public":
        return f"{split}.jsonl"
    return FULL_SHOT_FILE


def load_test_records(
    dataset: str | DatasetInfo, root: Path, metadata_dir: Path | None = None
) -> list[dict]:
    """The full-shot records from `<metadata_dir>/<records_file>`, built there if missing."""
    root = Path(root)
    folder = Path(metadata_dir) if metadata_dir is not None else root
    return _load_or_write(
        dataset, root, folder / records_file(dataset), lambda: build_records(dataset, root)
    )


def ensure_training_records(
    dataset: str | DatasetInfo,
    root: Path,
    training_mode: str,
    shot: int,
    seed: int,
    metadata_dir: Path | None = None,
) -> list[dict]:
    """Training records: full shot, or `{shot}-shot.jsonl` sampled from it (`shot` 0 = full).

    An existing `{shot}-shot.jsonl` is reused whatever `seed` is; delete it to resample.
    MVTec AD 2 trains on test_public only: its validation split is for thresholds and its
    private splits are unlabelled.
    """
    if training_mode not in TRAINING_MODES:
        raise ConfigError(
            f"--training_mode {training_mode} is unknown; choose one of {', '.join(TRAINING_MODES)}"
        )
    if records_file(dataset) != FULL_SHOT_FILE:
        split = dict(get_dataset_info(dataset).options)["split"]
        raise ConfigError(
            f"training reads MVTec AD 2's test_public split, not --split {split} (validation is "
            "for thresholds, the private splits are unlabelled); use --split test_public"
        )
    root = Path(root)
    folder = Path(metadata_dir) if metadata_dir is not None else root
    full = load_test_records(dataset, root, folder)
    require_labelled(full, "training")
    if training_mode == "full_shot" or shot == 0:
        return full
    return _load_or_write(
        dataset, root, folder / f"{shot}-shot.jsonl", lambda: sample_k_shot(full, shot, seed)
    )
