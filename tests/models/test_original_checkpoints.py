"""Checkpoints of the original code load unchanged: for each original format, a state dict in
that code's exact key layout (random values, built here) loads with no flags, and the model
predicts exactly what the same weights give through our own format."""

from __future__ import annotations

import re

import pytest
import torch

import test as test_script
from models.aaclip import AAClip, AAClipConfig
from models.aaclip_cross_attn import AAClipCrossAttn, AAClipCrossAttnConfig
from models.feclip import FEClip, FEClipConfig
from models.registry import load_trained_model
from models.sowa import SOWA, SOWAConfig
from utils.core.checkpoint import save_checkpoint
from utils.engine.training import RunConfig, checkpoint_config

NAMES = ["tile", "dots"]


def seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if not name.startswith("clipmodel."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def assert_same_predictions(loaded, reference) -> None:
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    got, expected = loaded.predict(images, NAMES), reference.predict(images, NAMES)
    assert torch.equal(got.anomaly_map, expected.anomaly_map)
    assert torch.equal(got.image_score, expected.image_score)


def ours(model, tmp_path) -> torch.nn.Module:
    """The same weights through our own format (a checkpoint with its config)."""
    folder = tmp_path / "ours"
    for stage in model.stages():
        payload = {"epoch": 1, **model.stage_state(stage)}
        payload["config"] = checkpoint_config(model, RunConfig())
        save_checkpoint(folder / f"{stage.stem}.pth", payload)
    return load_trained_model(folder, "cpu")[1]


def fork_state(model: FEClip) -> dict[str, torch.Tensor]:
    """The FE-CLIP fork's `model_state_dict` of our weights: `model.` keys, Sequential-wrapped
    FFE Linear and LFS Conv."""
    state = {}
    for key, value in model.trainable_state_dict().items():
        key = re.sub(r"^ffe\.(\d+)\.fc\.", r"ffe.\1.mlp.0.", key)
        key = re.sub(r"^lfs\.(\d+)\.conv\.", r"lfs.\1.conv.0.", key)
        state[f"model.{key}"] = value
    return state


def test_the_feclip_forks_best_model_pt_loads(tmp_path):
    config = FEClipConfig(block_indices=[5, 11, 17, 23], lambda_fuse=0.1).resolve("Synthetic")
    reference = seeded(FEClip.from_config(config), 1)
    state = fork_state(reference)
    state["model.clip.visual.proj"] = torch.randn(64, 32)  # the fork saves the frozen CLIP too
    state["model.ffe.0.basis"] = torch.eye(3)
    path = tmp_path / "best_model.pt"
    torch.save(
        {"epoch": 4, "model_state_dict": state, "tap_indices": [5, 11, 17, 23], "loss": 0.3},
        path,
    )
    name, loaded, payload = load_trained_model(path, "cpu")
    assert name == "feclip" and loaded.config.block_indices == [5, 11, 17, 23]
    assert_same_predictions(loaded, reference)
    assert_same_predictions(loaded, ours(reference, tmp_path))


def test_the_sowa_lightning_checkpoint_loads(tmp_path):
    config = SOWAConfig(depth=2, prompt_length=6).resolve("Synthetic")
    reference = seeded(SOWA.from_config(config), 2)
    state = {}
    for key, value in reference.trainable_state_dict().items():
        key = re.sub(r"^(adapters\.\d+\.blocks\.\d+)\.mlp\.", r"\1.mlp.layers.0.", key)
        key = re.sub(r"^adapters\.", "visual_encoder.adapters.", key)
        key = re.sub(r"^text_linear\.", "cross_fusion.linear.", key)
        state[f"net.{key}"] = value
    window = reference.adapters[0].blocks[0].attn.window  # the tiny grid's global window
    for adapter in range(4):
        for block in range(2):
            buffers = f"net.visual_encoder.adapters.{adapter}.blocks.{block}.attn."
            state[buffers + "relative_coords_table"] = torch.zeros(
                1, 2 * window - 1, 2 * window - 1, 2
            )
    state["net.visual_encoder.clip_model.visual.proj"] = torch.randn(64, 32)  # the frozen CLIP
    path = tmp_path / "epoch_000.ckpt"
    torch.save(
        {
            "epoch": 0,
            "global_step": 12,
            "pytorch-lightning_version": "2.3.0",
            "state_dict": state,
            "hyper_parameters": {"net": {"feature_map_idx": [5, 11, 17, 23]}},
        },
        path,
    )
    name, loaded, _ = load_trained_model(path, "cpu")
    assert name == "sowa"
    assert (loaded.config.depth, loaded.config.prompt_length) == (2, 6)
    assert_same_predictions(loaded, reference)
    assert_same_predictions(loaded, ours(reference, tmp_path))


def test_the_cross_attention_forks_files_evaluate_with_no_flags(tmp_path, synthetic_root, caplog):
    config = AAClipCrossAttnConfig(
        cross_attn_init="xavier", cross_attn_at_test="none", text_adapt_until=2
    ).resolve("Synthetic")
    reference = seeded(AAClipCrossAttn.from_config(config), 3)
    folder = tmp_path / "fork"
    text, image = reference.stages()
    text_state = {"epoch": 5, **reference.stage_state(text), "text_optimizer": {}}
    save_checkpoint(folder / "text_adapter_cross_attn.pth", text_state)
    image_state = {"epoch": 3, **reference.stage_state(image), "image_optimizer": {}}
    save_checkpoint(folder / "image_adapter_cross_attn_3.pth", image_state)
    path = folder / "image_adapter_cross_attn_3.pth"
    name, loaded, _ = load_trained_model(path, "cpu")
    assert name == "aaclip_cross_attn"
    assert (loaded.config.cross_attn_init, loaded.config.cross_attn_at_test) == ("xavier", "none")
    assert loaded.config.text_adapt_until == 2  # read from the weights
    assert_same_predictions(loaded, reference)
    assert_same_predictions(loaded, ours(reference, tmp_path))
    argv = ["--checkpoint", str(path), "--data_root", str(synthetic_root), "--device", "cpu"]
    assert test_script.main([*argv, "--results_dir", str(tmp_path / "eval")]) == 0
    assert "a file of the original aaclip_cross_attn code" in caplog.text


@pytest.mark.parametrize("relu", [False, True])
def test_the_original_aaclip_files_load_with_their_settings_read_from_the_weights(relu, tmp_path):
    config = AAClipConfig(relu=relu, image_adapt_until=5, text_adapt_until=2).resolve("Synthetic")
    reference = seeded(AAClip.from_config(config), 4)
    folder = tmp_path / "original"
    text, image = reference.stages()
    save_checkpoint(folder / "text_adapter.pth", {"epoch": 5, **reference.stage_state(text)})
    save_checkpoint(folder / "image_adapter_15.pth", {"epoch": 15, **reference.stage_state(image)})
    name, loaded, _ = load_trained_model(folder / "image_adapter_15.pth", "cpu")
    assert name == "aaclip"
    settings = (loaded.config.relu, loaded.config.image_adapt_until, loaded.config.text_adapt_until)
    assert settings == (relu, 5, 2)
    assert_same_predictions(loaded, reference)
    assert_same_predictions(loaded, ours(reference, tmp_path))


def test_the_feclip_fork_file_through_test_py_with_model_feclip(tmp_path, synthetic_root):
    reference = seeded(FEClip.from_config(FEClipConfig().resolve("Synthetic")), 5)
    state = fork_state(reference)
    path = tmp_path / "best_model.pt"
    torch.save({"epoch": 2, "model_state_dict": state, "tap_indices": [15, 18, 21, 23]}, path)
    argv = ["--checkpoint", str(path), "--model", "feclip", "--data_root", str(synthetic_root)]
    assert test_script.main([*argv, "--device", "cpu", "--results_dir", str(tmp_path)]) == 0
    assert (tmp_path / "results_Synthetic_best_model.json").is_file()
