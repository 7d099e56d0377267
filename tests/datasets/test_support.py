"""k-shot support sets: normal train-split images, drawn with a seed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets.preprocessing import Preprocessing
from datasets.support import draw_support, load_images, support_candidates
from utils.core.errors import DataError


def test_support_is_drawn_from_the_train_split_with_a_seed(synthetic_root):
    candidates = support_candidates("Synthetic", synthetic_root, "tile")
    assert len(candidates) == 8
    assert all(path.parent == synthetic_root / "tile" / "train" / "good" for path in candidates)
    assert candidates == sorted(candidates)
    first = draw_support("Synthetic", synthetic_root, "tile", 3, seed=7)
    assert first == draw_support("Synthetic", synthetic_root, "tile", 3, seed=7)
    assert len(set(first)) == 3 and set(first) <= set(candidates)
    draws = {tuple(draw_support("Synthetic", synthetic_root, "tile", 3, seed)) for seed in range(6)}
    assert len(draws) > 1


def test_fewer_candidates_than_k_gives_all_of_them(synthetic_root):
    drawn = draw_support("Synthetic", synthetic_root, "dots", 20, seed=0)
    assert drawn == support_candidates("Synthetic", synthetic_root, "dots")


def test_load_support_images_shapes(synthetic_root):
    paths = draw_support("Synthetic", synthetic_root, "stripes", 2, seed=1)
    images = load_images(paths, Preprocessing(64))
    assert images.shape == (2, 3, 64, 64)


def _write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


def test_visa_reads_train_normal_rows_of_the_split_csv(tmp_path):
    rows = ["object,split,label,image,mask"]
    for split, label, name in [
        ("train", "normal", "a.JPG"),
        ("train", "normal", "b.JPG"),
        ("train", "anomaly", "c.JPG"),
        ("test", "normal", "d.JPG"),
    ]:
        _write_image(tmp_path / "candle" / name)
        rows.append(f"candle,{split},{label},candle/{name},")
    rows.append("pcb1,train,normal,pcb1/e.JPG,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    candidates = support_candidates("VisA", tmp_path, "candle")
    assert [path.name for path in candidates] == ["a.JPG", "b.JPG"]


def test_btad_reads_train_ok(tmp_path):
    for name in ("0.png", "1.png"):
        _write_image(tmp_path / "01" / "train" / "ok" / name)
    _write_image(tmp_path / "01" / "test" / "ok" / "2.png")
    assert [p.name for p in support_candidates("BTAD", tmp_path, "01")] == ["0.png", "1.png"]


def test_data_sets_without_a_normal_train_split_are_refused(tmp_path, synthetic_root):
    with pytest.raises(DataError, match="Brain has no train split of normal images"):
        support_candidates("Brain", tmp_path, "Brain")
    with pytest.raises(DataError, match="no normal train images in"):
        support_candidates("MVTec", tmp_path, "bottle")
    with pytest.raises(DataError, match="--k_shot 0 must be >= 1"):
        draw_support("Synthetic", synthetic_root, "tile", 0, seed=0)


def test_dagm_support_is_the_defect_free_train_images(tmp_path):
    train = tmp_path / "Class3" / "Train"
    for name in ("0001.PNG", "0002.PNG", "0003.PNG"):
        _write_image(train / name)
    (train / "Label").mkdir()
    (train / "Label" / "Labels.txt").write_text(
        "1\n1\t0\t0001.PNG\t0\t0\n2\t1\t0002.PNG\t0\t0002_label.PNG\n3\t0\t0003.PNG\t0\t0\n"
    )
    candidates = support_candidates("DAGM", tmp_path, "Class3")
    assert [path.name for path in candidates] == ["0001.PNG", "0003.PNG"]
