"""The vision tower against transformers' Gemma 4 vision model, and its weights in the checkpoint's names."""

from __future__ import annotations

import json

import pytest
import torch

import dgemma
from dgemma.config import DiffusionGemmaConfig, VisionConfig
from dgemma.model.weights import CheckpointError

pytest.importorskip("transformers")


def _images(sizes, budget=70, seed=0):
    """Processed random images (transformers' PIL processor), as the model takes them."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=budget)(
        images=images, return_tensors="pt")
    return out["pixel_values"], out["image_position_ids"]


@torch.no_grad()
def test_image_features_match_transformers(vision_checkpoint):
    """Several images of different shapes (different numbers of real patches and of padding) in one call."""
    path, ref = vision_checkpoint
    ours = dgemma.DiffusionGemma.from_pretrained(path).model
    pixels, positions = _images([(50, 30), (30, 50), (64, 64), (200, 9)])
    expected = ref.model.encoder.get_image_features(pixels, positions)
    got = ours.image_features(pixels, positions)
    hidden = ours.vision_tower(pixels, positions)
    assert (hidden - expected.last_hidden_state).abs().max() <= 1e-5
    assert [f.shape[0] for f in got] == [60, 60, 64, 39]  # a long thin image keeps its aspect: 1 x 39 blocks
    assert (torch.cat(got) - expected.pooler_output).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_tower_stays_close(vision_checkpoint, dtype):
    """bf16 / fp16 weights: pooling and standardization in fp32, one cast at the end, as the reference does."""
    path, ref = vision_checkpoint
    ours = dgemma.DiffusionGemma.from_pretrained(path, dtype=dtype).model
    pixels, positions = _images([(50, 30)])
    got = torch.cat(ours.image_features(pixels, positions))
    assert got.dtype == getattr(torch, dtype)
    expected = ref.model.encoder.get_image_features(pixels, positions).pooler_output
    assert torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_weights_round_trip_under_the_checkpoint_names(vision_checkpoint, tmp_path):
    """dgemma writes the tower under `model.encoder.vision_tower.*` / `embed_vision.*`; transformers reads it back."""
    from safetensors import safe_open
    from transformers import DiffusionGemmaForBlockDiffusion

    path, ref = vision_checkpoint
    model = dgemma.DiffusionGemma.from_pretrained(path)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    ref_names = {n for n in ref.state_dict() if ".vision_tower." in n or ".embed_vision." in n}
    assert ref_names and ref_names <= names
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["patch_size"] == 4
    back = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval()
    for name in ref_names:
        assert torch.equal(back.state_dict()[name], ref.state_dict()[name]), name


def test_text_only_config_skips_a_tower_in_the_checkpoint(vision_checkpoint, tmp_path):
    path, _ = vision_checkpoint
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["vision_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = dgemma.DiffusionGemma.from_pretrained(tmp_path).model
    assert model.vision_tower is None
    with pytest.raises(ValueError, match="no vision tower"):
        model.image_features(torch.zeros(1, 16, 48), torch.zeros(1, 16, 2, dtype=torch.long))


def test_a_missing_tower_tensor_is_named(vision_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = vision_checkpoint
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.encoder.vision_tower.std_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="vision_tower.std_scale"):
        dgemma.DiffusionGemma.from_pretrained(tmp_path)


def test_vision_config_reads_and_writes_hf_fields():
    cfg = DiffusionGemmaConfig.from_hf_dict({
        "model_type": "diffusion_gemma", "text_config": {"num_experts": 4, "top_k_experts": 2,
                                                          "moe_intermediate_size": 8},
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 1152, "head_dim": 72,
                          "default_output_length": 280}})
    assert isinstance(cfg.vision_config, VisionConfig) and cfg.vision_config.patch_size == 16
    d = cfg.to_hf_dict()["vision_config"]
    assert d["default_output_length"] == 280 and d["hidden_size"] == 1152 and d["model_type"] == "gemma4_vision"
    with pytest.raises(dgemma.ConfigError, match="multiple of 4"):
        VisionConfig(head_dim=18)
    with pytest.raises(dgemma.ConfigError, match="axial"):
        VisionConfig(rope_parameters={"rope_type": "default", "rope_theta": 1.0})
