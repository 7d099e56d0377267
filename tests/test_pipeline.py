"""One preprocessing for every path (issue 25): for each model, the same image file reaches the
model as the same tensor and valid mask through test.py's loader, predict.py's reader and the
preprocessing an export records; a trained FE-CLIP scores a file the same in test.py and in
predict.py score. (tests/test_deploy.py checks the same through real exported graphs.)"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import test as test_script
import train
from datasets.anomaly import TestDataset
from datasets.folder import ImageFolder
from datasets.preprocessing import Preprocessing
from models import backbone
from models.registry import MODELS
from utils.inference.predictor import AnomalyPredictor


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A wide RGBA image with a transparent corner and its mask, as a data set ships them."""
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 90, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[:10, :10, 3] = 0  # transparent: composited over the pad colour on every path
    (root / "images").mkdir()
    Image.fromarray(pixels, "RGBA").save(root / "images" / "wide.png")
    mask = np.zeros((60, 90), np.uint8)
    mask[20:40, 5:30] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root


def model_of(name: str, overrides: dict) -> torch.nn.Module:
    config = MODELS[name].config_class(model_name="tiny", img_size=64, **overrides)
    return MODELS[name](config, backbone.tiny_clip(64, quick_gelu=config.quick_gelu))


@pytest.mark.parametrize("overrides", [{}, {"preprocess": "letterbox", "pad_color": [0, 90, 0]}])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_path_feeds_the_model_the_same_tensor(picture, name, overrides):
    predictor = AnomalyPredictor(model_of(name, overrides))
    preprocessing = predictor.preprocessing
    record = {"image_path": "images/wide.png", "label": 1, "class_name": "x"}
    loaded = TestDataset([{**record, "mask_path": "mask.png"}], picture, preprocessing)[0]
    read = ImageFolder(picture / "images", preprocessing)[0]
    recorded = json.loads(json.dumps(preprocessing.to_dict()))  # model.json's, via a file
    exported = ImageFolder(picture / "images", Preprocessing.from_dict(recorded))[0]
    for item in (read, exported):
        assert torch.equal(item.image, loaded.image)
        assert torch.equal(item.valid_mask, loaded.valid_mask)
    assert loaded.mask.shape == (1, 64, 64) and loaded.mask.any()
    geometry = overrides.get("preprocess", MODELS[name].config_class().preprocess)
    backend = "torch" if name == "feclip" else "pil"  # each original's own resize
    assert (preprocessing.geometry, preprocessing.backend) == (geometry, backend)
    assert bool(loaded.valid_mask.all()) == (geometry != "letterbox")


def test_feclip_scores_a_file_the_same_in_test_py_and_predict_py(synthetic_root, tmp_path):
    data_root = tmp_path / "Synthetic"
    shutil.copytree(synthetic_root, data_root)
    run = tmp_path / "feclip"
    argv = ["--model", "feclip", "--data_root", str(data_root), "--save_path", str(run)]
    argv += ["--epochs", "1", "--batch_size", "4", "--training_mode", "few_shot", "--shot", "4"]
    assert train.main([*argv, "--device", "cpu"]) == 0
    common = ["--checkpoint", str(run), "--device", "cpu", "--batch_size", "8"]
    argv = ["--save_path", str(run), "--data_root", str(data_root), "--device", "cpu"]
    assert test_script.main([*argv, "--batch_size", "8", "--results_dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results_Synthetic.json").read_text())
    assert results["meta"]["preprocessing"]["backend"] == "torch"  # the fork's, by default
    normal = data_root / "tile" / "train" / "good"
    assert predict.main(["calibrate", *common, "--normal_dir", str(normal)]) == 0
    out = tmp_path / "scored"
    test_dir = data_root / "tile" / "test"
    assert predict.main(["score", *common, "--input", str(test_dir), "--out", str(out)]) == 0
    with open(out / "scores.csv", newline="") as handle:
        scored = {f"tile/test/{row['file']}": row["image_score"] for row in csv.DictReader(handle)}
    images = results["images"]["tile"]
    assert sorted(scored) == sorted(image["file"] for image in images) and len(images) == 32
    for image in images:  # scores.csv prints 8 significant digits
        assert f"{image['score']:.8g}" == scored[image["file"]], image["file"]
