"""The field engineer's path (issue 26). Fine-tuning with image labels only: an anomalous image
without a mask has an unknown mask; pixel losses skip it per sample, image losses use every
image; a stage with no image-level loss refuses records without masks; `--pixel_loss off`
ignores every mask. What was trained is what is scored: the run's class reaches calibrate,
score and export, and test.py names its results by what distinguishes them."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import predict
import test as test_script
import train
from models.aaclip import stage1_loss
from models.forward_utils import calculate_seg_loss, known_masks, pixel_loss

CLASS = "metal_tile"  # a Folder run's class; its prompt is "metal tile"
SOURCE = "tile"  # the synthetic class its images come from


def test_pixel_losses_skip_unknown_masks_per_sample():
    torch.manual_seed(0)
    preds = torch.rand(4, 2, 8, 8, requires_grad=True)
    mask = (torch.rand(4, 1, 8, 8) > 0.7).float()
    known = torch.tensor([True, False, True, False])
    batch = {"mask": mask, "mask_known": known}
    assert known_masks(batch).tolist() == known.tolist()
    assert known_masks({"mask": mask}).all()  # a batch that does not say: every mask is known
    skipped = pixel_loss(calculate_seg_loss, known_masks(batch), preds, mask)
    assert torch.equal(skipped, calculate_seg_loss(preds[[0, 2]], mask[[0, 2]]))
    everything = pixel_loss(calculate_seg_loss, torch.ones(4, dtype=torch.bool), preds, mask)
    assert torch.equal(everything, calculate_seg_loss(preds, mask))  # unchanged when all known
    none = pixel_loss(calculate_seg_loss, torch.zeros(4, dtype=torch.bool), preds, mask)
    assert none.item() == 0 and none.requires_grad  # a zero that keeps the graph
    none.backward()
    assert torch.equal(preds.grad, torch.zeros_like(preds))
    anchors = torch.nn.functional.normalize(torch.rand(4, 16, 2), dim=1)
    level = stage1_loss([preds], mask, anchors, 0.0, known=known)
    assert torch.equal(level, calculate_seg_loss(preds[[0, 2]], mask[[0, 2]]))


@pytest.fixture(scope="module")
def unmasked(synthetic_root, tmp_path_factory):
    """A Folder set of the synthetic class: normal/ and abnormal/ images, no masks."""
    root = tmp_path_factory.mktemp("unmasked")
    for sub in sorted((synthetic_root / SOURCE / "test").iterdir()):
        target = root / ("normal" if sub.name == "good" else "abnormal")
        target.mkdir(exist_ok=True)
        for path in sub.iterdir():
            shutil.copy(path, target / f"{sub.name}_{path.name}")
    return root


def folder_argv(root, save_path) -> list[str]:
    return [
        "--dataset", "Folder", "--class_name", CLASS, "--data_root", str(root),
        "--normal_dir", "normal", "--abnormal_dir", "abnormal", "--device", "cpu",
        "--save_path", str(save_path), "--training_mode", "full_shot", "--model_name", "tiny",
    ]  # fmt: skip


def epoch_terms(text: str, name: str) -> list[float]:
    return [float(value) for value in re.findall(rf"{name} (\d+\.\d+)", text)]


@pytest.fixture(scope="module")
def feclip_run(unmasked, tmp_path_factory):
    """FE-CLIP fine-tuned on the Folder set without masks, and what its training logged."""
    save_path = tmp_path_factory.mktemp("feclip") / "run"
    argv = folder_argv(unmasked, save_path)
    argv += ["--model", "feclip", "--epochs", "3", "--batch_size", "8", "--lr", "0.001"]
    assert train.main(argv) == 0
    return save_path, (save_path / "train_feclip.log").read_text()


def test_feclip_trains_image_losses_on_images_without_masks(unmasked, feclip_run):
    _, log = feclip_run
    normal, anomalous = (len(list((unmasked / sub).iterdir())) for sub in ("normal", "abnormal"))
    total = normal + anomalous
    line = f"pixel losses on {normal} of {total} images ({anomalous} anomalous without a mask)"
    assert line in log and f"image losses on {total}" in log
    cls = epoch_terms(log, "cls")
    assert len(cls) == 3 and cls[2] < cls[1] < cls[0]  # the image loss falls on labels alone


def test_the_trained_class_is_what_calibrate_export_and_score_use(
    feclip_run, unmasked, tmp_path, caplog
):
    run, _ = feclip_run
    caplog.set_level("INFO")
    normal = str(unmasked / "normal")
    calibration = tmp_path / "calibration.json"
    argv = ["calibrate", "--checkpoint", str(run), "--normal_dir", normal, "--device", "cpu"]
    assert predict.main([*argv, "--output", str(calibration)]) == 0
    assert json.loads(calibration.read_text())["class_name"] == "metal tile"
    assert "class 'metal tile': the checkpoint's, its Folder run's --class_name metal_tile" in (
        caplog.text
    )
    scored = tmp_path / "scored"
    argv = ["score", "--checkpoint", str(run), "--calibration", str(calibration), "--device"]
    argv += ["cpu", "--input", str(unmasked / "abnormal"), "--out", str(scored), "--no-overlays"]
    assert predict.main(argv) == 0
    assert "metal tile" in (scored / "index.html").read_text()
    out = tmp_path / "export"
    argv = ["export", "--checkpoint", str(run), "--out", str(out), "--calibration"]
    assert predict.main([*argv, str(calibration)]) == 0
    classes = json.loads((out / "model.json").read_text())["classes"]
    assert classes == [{"name": "metal tile", "prompt": "metal tile"}]
    caplog.clear()
    uncalibrated = tmp_path / "export2"
    argv = ["export", "--checkpoint", str(run), "--out", str(uncalibrated), "--class_name", "pcb"]
    assert predict.main(argv) == 0  # a flag wins
    classes = json.loads((uncalibrated / "model.json").read_text())["classes"]
    assert classes == [{"name": "pcb", "prompt": "pcb"}] and "class 'pcb' (--class_name)" in (
        caplog.text
    )


def test_results_are_named_and_headed_by_what_distinguishes_them(synthetic_root, tmp_path):
    run = tmp_path / "sowa"
    argv = ["--data_root", str(synthetic_root), "--device", "cpu", "--model", "sowa"]
    argv += ["--save_path", str(run), "--epochs", "1", "--batch_size", "4"]
    assert train.main([*argv, "--training_mode", "few_shot", "--shot", "4"]) == 0
    common = ["--data_root", str(synthetic_root), "--device", "cpu", "--save_path", str(run)]
    assert test_script.main(common) == 0
    assert test_script.main([*common, "--k_shot", "2"]) == 0
    zero = json.loads((run / "results_Synthetic.json").read_text())
    few = json.loads((run / "results_Synthetic_2shot.json").read_text())
    assert zero["meta"]["k_shot"] == 0 and few["meta"]["k_shot"] == 2  # neither overwrote
    assert few["meta"]["variant"] == "2-shot"
    assert "variant: 2-shot" in (run / "results_Synthetic_2shot.md").read_text()
    assert "variant: zero-shot, whole image, torch" in (run / "results_Synthetic.md").read_text()


def test_pixel_loss_off_trains_on_image_labels_only(synthetic_root, tmp_path, caplog):
    argv = ["--data_root", str(synthetic_root), "--device", "cpu", "--model", "sowa"]
    argv += ["--save_path", str(tmp_path / "sowa"), "--epochs", "1", "--batch_size", "4"]
    argv += ["--training_mode", "few_shot", "--shot", "4", "--pixel_loss", "off"]
    caplog.set_level("INFO")
    assert train.main(argv) == 0
    assert "pixel losses on 0 of 12 images (0 anomalous without a mask; --pixel_loss off)" in (
        caplog.text
    )
    assert epoch_terms(caplog.text, "seg") == [0.0]  # no mask was used
    assert epoch_terms(caplog.text, "ce")[0] > 0


def test_a_stage_without_an_image_loss_refuses_records_without_masks(
    unmasked, tmp_path, one_line_error, caplog
):
    argv = folder_argv(unmasked, tmp_path / "aaclip")
    argv += ["--text_epoch", "1", "--image_epoch", "1", "--text_batch_size", "8"]
    assert train.main(argv) == 2
    message = one_line_error()
    assert "train_text_adapter learns from defect masks only" in message
    anomalous = len(list((unmasked / "abnormal").iterdir()))
    assert f"none of its {anomalous} anomalous images has a mask" in message
    assert "--stage1_cls_loss" in message
    assert not (tmp_path / "aaclip" / "config.yaml").exists()  # refused before any epoch
    caplog.clear()
    caplog.set_level("INFO")
    assert train.main([*argv, "--stage1_cls_loss", "--image_batch_size", "8"]) == 0
    assert "train_text_adapter: pixel losses on 16 of 32 images" in caplog.text
    assert "train_image_adapter: pixel losses on 16 of 32 images" in caplog.text
