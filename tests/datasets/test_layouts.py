"""Every supported layout as its publisher ships it: a miniature tree in the download's exact
naming, including what a real download holds that is not a test record (train folders, licence
and readme files, VisA's train rows, DAGM's defect-free label rows, Br35H's unlabelled `pred/`),
and the records it gives, checked exactly. Then training and evaluation end to end on each
layout added for FE-CLIP's and SOWA's tables and on your own folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test as test_script
import train
from datasets.catalog import CATALOG, folder_info
from datasets.metadata import build_records


def image(path: Path, value: int = 128, size: tuple[int, int] = (32, 32)) -> None:
    """A small image; its format follows the suffix (`.bmp`, `.PNG`, `.jpeg` ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = np.clip(rng.normal(value, 20, (*size[::-1], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=_format(path))


def mask(path: Path, size: tuple[int, int] = (32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(size[::-1], dtype=np.uint8)
    pixels[8:20, 10:22] = 255
    Image.fromarray(pixels).save(path, format=_format(path))


def _format(path: Path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF"}.get(
        path.suffix.lower(), "PNG"
    )


def text(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def r(image_path: str, label: int, class_name: str, mask_path: str = "") -> dict:
    return {
        "image_path": image_path,
        "label": label,
        "class_name": class_name,
        "mask_path": mask_path,
    }


def mvtec(root: Path) -> list[dict]:
    text(root / "license.txt", "CC BY-NC-SA 4.0")
    text(root / "readme.txt", "MVTec AD")
    image(root / "bottle/train/good/000.png")
    image(root / "bottle/test/good/000.png")
    image(root / "bottle/test/broken_large/000.png")
    mask(root / "bottle/ground_truth/broken_large/000_mask.png")
    image(root / "metal_nut/test/good/000.png")
    image(root / "metal_nut/test/color/000.png")
    mask(root / "metal_nut/ground_truth/color/000_mask.png")
    gt = "ground_truth"
    return [
        r(
            "bottle/test/broken_large/000.png",
            1,
            "bottle",
            f"bottle/{gt}/broken_large/000_mask.png",
        ),
        r("bottle/test/good/000.png", 0, "bottle"),
        r("metal_nut/test/color/000.png", 1, "metal_nut", f"metal_nut/{gt}/color/000_mask.png"),
        r("metal_nut/test/good/000.png", 0, "metal_nut"),
    ]


def visa(root: Path) -> list[dict]:
    text(root / "LICENSE-DATASET", "CC BY 4.0")
    text(root / "candle/image_anno.csv", "image,label,mask\n")
    image(root / "candle/Data/Images/Normal/0000.JPG")
    image(root / "candle/Data/Images/Normal/0001.JPG")
    image(root / "candle/Data/Images/Anomaly/000.JPG")
    mask(root / "candle/Data/Masks/Anomaly/000.png")
    text(
        root / "split_csv/1cls.csv",
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n",
    )
    return [
        r("candle/Data/Images/Anomaly/000.JPG", 1, "candle", "candle/Data/Masks/Anomaly/000.png"),
        r("candle/Data/Images/Normal/0000.JPG", 0, "candle"),
    ]


def btad(root: Path) -> list[dict]:
    # BTech_Dataset_transformed: 01 and 03 .bmp images, 02 .png; 01/02 .png masks, 03 .bmp masks.
    image(root / "01/train/ok/0000.bmp")
    image(root / "01/test/ok/0000.bmp")
    image(root / "01/test/ko/0000.bmp")
    mask(root / "01/ground_truth/ko/0000.png")
    image(root / "02/test/ok/0000.png")
    image(root / "02/test/ko/0001.png")
    mask(root / "02/ground_truth/ko/0001.png")
    image(root / "03/test/ok/0000.bmp")
    image(root / "03/test/ko/0003.bmp")
    mask(root / "03/ground_truth/ko/0003.bmp")
    return [
        r("01/test/ko/0000.bmp", 1, "01", "01/ground_truth/ko/0000.png"),
        r("01/test/ok/0000.bmp", 0, "01"),
        r("02/test/ko/0001.png", 1, "02", "02/ground_truth/ko/0001.png"),
        r("02/test/ok/0000.png", 0, "02"),
        r("03/test/ko/0003.bmp", 1, "03", "03/ground_truth/ko/0003.bmp"),
        r("03/test/ok/0000.bmp", 0, "03"),
    ]


def mpdd(root: Path) -> list[dict]:
    image(root / "bracket_black/train/good/000.png")
    image(root / "bracket_black/test/good/000.png")
    image(root / "bracket_black/test/hole/000.png")
    mask(root / "bracket_black/ground_truth/hole/000_mask.png")
    name = "bracket_black"
    return [
        r(f"{name}/test/good/000.png", 0, name),
        r(f"{name}/test/hole/000.png", 1, name, f"{name}/ground_truth/hole/000_mask.png"),
    ]


def bmad(name: str, stem: str) -> Callable[[Path], list[dict]]:
    def build(root: Path) -> list[dict]:
        image(root / f"train/good/img/{stem}_0.png")
        image(root / f"valid/good/img/{stem}_1.png")
        image(root / f"valid/Ungood/img/{stem}_2.png")
        mask(root / f"valid/Ungood/label/{stem}_2.png")
        image(root / f"test/good/img/{stem}_3.png")
        image(root / f"test/Ungood/img/{stem}_4.png")
        mask(root / f"test/Ungood/label/{stem}_4.png")
        return [
            r(f"test/Ungood/img/{stem}_4.png", 1, name, f"test/Ungood/label/{stem}_4.png"),
            r(f"test/good/img/{stem}_3.png", 0, name),
        ]

    return build


def colon(class_name: str, stems: tuple[str, str]) -> Callable[[Path], list[dict]]:
    def build(root: Path) -> list[dict]:
        for stem in stems:
            image(root / f"images/{stem}.png")
            mask(root / f"masks/{stem}.png")
        return [r(f"images/{stem}.png", 1, class_name, f"masks/{stem}.png") for stem in stems]

    return build


def dtd(root: Path) -> list[dict]:
    image(root / "Woven_001/train/good/000.png")
    image(root / "Woven_001/test/good/000.png")
    image(root / "Woven_001/test/bad/000.png")
    mask(root / "Woven_001/ground_truth/bad/000_mask.png")
    image(root / "Blotchy_099/test/good/001.png")
    image(root / "Blotchy_099/test/bad/002.png")
    mask(root / "Blotchy_099/ground_truth/bad/002_mask.png")
    blotchy, woven = "Blotchy_099", "Woven_001"
    return [
        r(f"{blotchy}/test/bad/002.png", 1, blotchy, f"{blotchy}/ground_truth/bad/002_mask.png"),
        r(f"{blotchy}/test/good/001.png", 0, blotchy),
        r(f"{woven}/test/bad/000.png", 1, woven, f"{woven}/ground_truth/bad/000_mask.png"),
        r(f"{woven}/test/good/000.png", 0, woven),
    ]


def dagm(root: Path) -> list[dict]:
    for split in ("Train", "Test"):
        for index in (1, 2, 3):
            image(root / f"Class1/{split}/{index:04d}.PNG", value=90 + 20 * index)
        rows = "1\n1\t0\t0001.PNG\t0\t0\n2\t1\t0002.PNG\t0\t0002_label.PNG\n3\t0\t0003.PNG\t0\t0\n"
        text(root / f"Class1/{split}/Label/Labels.txt", rows)
        mask(root / f"Class1/{split}/Label/0002_label.PNG")
    return [
        r("Class1/Test/0001.PNG", 0, "Class1"),
        r("Class1/Test/0002.PNG", 1, "Class1", "Class1/Test/Label/0002_label.PNG"),
        r("Class1/Test/0003.PNG", 0, "Class1"),
    ]


def brainmri(root: Path) -> list[dict]:
    image(root / "yes/Y1.jpg", value=180)
    image(root / "yes/Y10.JPG", value=170)
    image(root / "no/1 no.jpeg", value=80)
    image(root / "no/N1.JPG", value=90)
    image(root / "brain_tumor_dataset/yes/Y1.jpg")  # the download's duplicate copy
    image(root / "brain_tumor_dataset/no/N1.JPG")
    return [
        r("no/1 no.jpeg", 0, "brain"),
        r("no/N1.JPG", 0, "brain"),
        r("yes/Y1.jpg", 1, "brain"),
        r("yes/Y10.JPG", 1, "brain"),
    ]


def br35h(root: Path) -> list[dict]:
    image(root / "yes/y0.jpg", value=180)
    image(root / "yes/y1.jpg", value=170)
    image(root / "no/no0.jpg", value=80)
    image(root / "no/no1.jpg", value=90)
    image(root / "pred/pred0.jpg")  # unlabelled
    return [
        r("no/no0.jpg", 0, "brain"),
        r("no/no1.jpg", 0, "brain"),
        r("yes/y0.jpg", 1, "brain"),
        r("yes/y1.jpg", 1, "brain"),
    ]


def headct(root: Path) -> list[dict]:
    for index, value in enumerate((180, 170, 80, 90)):
        image(root / f"head_ct/head_ct/{index:03d}.png", value=value)
    text(root / "labels.csv", "id, hemorrhage\n0,1\n1,1\n2,0\n3,0\n")
    return [r(f"head_ct/head_ct/{index:03d}.png", int(index < 2), "head") for index in range(4)]


def isic(root: Path) -> list[dict]:
    for stem in ("ISIC_0000003", "ISIC_0000012"):
        image(root / f"ISBI2016_ISIC_Part1_Test_Data/{stem}.jpg")
        mask(root / f"ISBI2016_ISIC_Part1_Test_GroundTruth/{stem}_Segmentation.png")
    text(root / "ISBI2016_ISIC_Part1_Test_GroundTruth.csv", "ISIC_0000003,0\n")
    return [
        r(
            f"ISBI2016_ISIC_Part1_Test_Data/{stem}.jpg",
            1,
            "skin",
            f"ISBI2016_ISIC_Part1_Test_GroundTruth/{stem}_Segmentation.png",
        )
        for stem in ("ISIC_0000003", "ISIC_0000012")
    ]


def folder(root: Path) -> list[dict]:
    image(root / "normal/board_01.png", value=90)
    image(root / "normal/board_02.JPG", value=95)
    image(root / "abnormal/board_03.png", value=170)
    image(root / "abnormal/board_04.bmp", value=175)
    mask(root / "masks/board_03.png")  # board_04 has no mask: image-level only
    text(root / "notes.txt", "line 3 samples")
    return [
        r("abnormal/board_03.png", 1, "pcb", "masks/board_03.png"),
        r("abnormal/board_04.bmp", 1, "pcb"),
        r("normal/board_01.png", 0, "pcb"),
        r("normal/board_02.JPG", 0, "pcb"),
    ]


LAYOUTS = {
    "MVTec": mvtec,
    "VisA": visa,
    "BTAD": btad,
    "MPDD": mpdd,
    "Brain": bmad("Brain", "brain"),
    "Liver": bmad("Liver", "liver"),
    "Retina": bmad("Retina", "retina"),
    "Colon_clinicDB": colon("Colon_clinicDB", ("1", "2")),
    "Colon_colonDB": colon("Colon_colonDB", ("1", "2")),
    "Colon_cvc300": colon("CVC-300", ("149", "150")),
    "Colon_Kvasir": colon("Kvasir", ("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4")),
    "DTD-Synthetic": dtd,
    "DAGM": dagm,
    "BrainMRI": brainmri,
    "Br35H": br35h,
    "HeadCT": headct,
    "ISIC": isic,
    "Folder": folder,
}


INFO = {"Folder": folder_info("pcb")}  # a run's own Folder set: its class from --class_name


@pytest.mark.parametrize("dataset", list(LAYOUTS))
def test_records_of_each_layout_as_its_publisher_ships_it(dataset, tmp_path):
    expected = LAYOUTS[dataset](tmp_path)
    assert build_records(INFO.get(dataset, dataset), tmp_path) == expected


def test_folder_from_a_csv(tmp_path):
    image(tmp_path / "imgs/a.png")
    image(tmp_path / "imgs/b.png")
    mask(tmp_path / "imgs/b_gt.png")
    text(tmp_path / "labels.csv", "image,label,mask\nimgs/a.png,0,\nimgs/b.png,1,imgs/b_gt.png\n")
    assert build_records(folder_info("weld", records_csv="labels.csv"), tmp_path) == [
        r("imgs/a.png", 0, "weld"),
        r("imgs/b.png", 1, "weld", "imgs/b_gt.png"),
    ]


@pytest.mark.parametrize(
    ("dataset", "extra"),
    [
        ("DTD-Synthetic", []),
        ("DAGM", []),
        # image labels only: AA-CLIP's stage 1 needs the paper's L_cls to learn from them
        ("BrainMRI", ["--stage1_cls_loss"]),
        ("Br35H", ["--stage1_cls_loss"]),
        ("HeadCT", ["--stage1_cls_loss"]),
        ("ISIC", ["--shot", "0"]),  # all anomalous: no normal image to sample, full shot
        # its 2-shot draw takes the anomalous image without a mask
        ("Folder", ["--class_name", "pcb", "--stage1_cls_loss"]),
    ],
)
def test_training_and_evaluation_end_to_end_on_each_new_layout(dataset, extra, tmp_path):
    root = tmp_path / dataset
    LAYOUTS[dataset](root)
    common = ["--dataset", dataset, "--data_root", str(root), "--device", "cpu"]
    common += ["--save_path", str(tmp_path / "run"), "--model_name", "tiny"]
    fast = ["--text_epoch", "1", "--image_epoch", "1", "--shot", "2", "--text_batch_size", "4"]
    assert train.main([*common, *fast, "--image_batch_size", "4", *extra]) == 0
    if dataset == "Folder":
        common += extra[:2]
    assert test_script.main(common) == 0
    assert (tmp_path / "run" / f"results_{dataset}.json").is_file()
    assert CATALOG["Folder"] == folder_info()  # a run's Folder set is its own, never the catalog's


def test_a_mask_of_another_size_is_one_line_unless_resize_masks(tmp_path, one_line_error, caplog):
    root = tmp_path / "MVTec"
    mvtec(root)
    mask(root / "bottle/ground_truth/broken_large/000_mask.png", size=(40, 30))
    argv = ["--dataset", "MVTec", "--data_root", str(root), "--device", "cpu"]
    argv += ["--model_name", "tiny", "--save_path", str(tmp_path / "run"), "--shot", "2"]
    argv += ["--text_epoch", "1", "--image_epoch", "0", "--text_batch_size", "4"]
    assert train.main(argv) == 2
    message = one_line_error()
    assert "masks must match their image" in message and "--resize_masks" in message
    caplog.clear()
    assert train.main([*argv, "--resize_masks"]) == 0
    assert "--resize_masks: 1 of 2 masks differ in size from their image" in caplog.text
