from pathlib import Path

import numpy as np
from PIL import Image

from datasets.catalog import get_dataset_info
from datasets.synthetic import ensure_synthetic, generate, is_complete, main


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def _arrays(root):
    return {path.relative_to(root).as_posix(): _read(path) for path in sorted(root.rglob("*.png"))}


def test_layout_counts(synthetic_root):
    for class_name in get_dataset_info("Synthetic").classes:
        folder = synthetic_root / class_name
        assert len(list((folder / "train" / "good").glob("*.png"))) == 8
        assert len(list((folder / "test" / "good").glob("*.png"))) == 16
        for defect in ("blob", "scratch"):
            assert len(list((folder / "test" / defect).glob("*.png"))) == 8
            masks = sorted((folder / "ground_truth" / defect).glob("*_mask.png"))
            assert len(masks) == 8
            for mask_path in masks:
                mask = _read(mask_path)
                assert mask.shape == (96, 96)
                assert set(np.unique(mask)) <= {0, 255}
                assert 0.03 <= (mask > 0).mean() <= 0.15


def test_deterministic_for_a_seed(tmp_path, synthetic_root):
    again = _arrays(generate(tmp_path / "a", seed=0))
    reference = _arrays(synthetic_root)
    assert again.keys() == reference.keys()
    assert all(np.array_equal(again[key], reference[key]) for key in reference)
    other = _arrays(generate(tmp_path / "b", seed=1))
    assert not all(np.array_equal(other[key], reference[key]) for key in reference)


def test_existing_kept_unless_overwrite(tmp_path):
    root = generate(tmp_path / "s", seed=0)
    first = _arrays(root)
    generate(root, seed=1)
    assert all(np.array_equal(first[k], v) for k, v in _arrays(root).items())
    generate(root, seed=1, overwrite=True)
    assert not all(np.array_equal(first[k], v) for k, v in _arrays(root).items())


def test_ensure_synthetic_generates_when_missing(tmp_path):
    root = tmp_path / "s"
    assert not is_complete(root)
    assert ensure_synthetic(root) == root
    assert is_complete(root)


def test_cli(tmp_path, capsys):
    assert main(["--root", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    assert main(["--root", str(tmp_path / "junk")]) == 1
