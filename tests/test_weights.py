"""Checkpoint loading: layouts, dtypes, and an error that names the problem for every bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
import dgemma.cli
from dgemma import CheckpointError, ConfigError
from dgemma.config import DiffusionGemmaConfig, GenerationConfig, preset


@pytest.fixture()
def saved(tmp_path):
    model = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    save_file(fn(tensors), path / "model.safetensors", metadata={"format": "pt"})


def assert_same_weights(a, b):
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y.to(x.dtype)), name


def test_round_trip_and_config_files(saved):
    model, path = saved
    assert json.loads((path / "config.json").read_text())["model_type"] == "diffusion_gemma"
    again = dgemma.DiffusionGemma.from_pretrained(path)
    assert_same_weights(model, again)
    assert again.config == model.config
    assert again.generation_config == model.generation_config


def test_tied_tensors_under_encoder_names_or_both(saved):
    """The real checkpoint names the shared layers after the encoder; transformers writes the decoder names."""
    model, path = saved

    def to_encoder(t):
        out = {}
        for k, v in t.items():
            if k.startswith("model.decoder.layers.") and not k.endswith("layer_scalar"):
                k = k.replace("model.decoder.", "model.encoder.language_model.")
            out[k.replace("model.decoder.embed_tokens", "model.encoder.language_model.embed_tokens")] = v
        out["lm_head.weight"] = out["model.encoder.language_model.embed_tokens.weight"].clone()
        return out

    rewrite(path, to_encoder)
    assert_same_weights(model, dgemma.DiffusionGemma.from_pretrained(path))

    def both(t):
        t = dict(t)
        t.update({k.replace("model.encoder.language_model.", "model.decoder."): v.clone() for k, v in t.items()
                  if k.startswith("model.encoder.language_model.layers.") and not k.endswith("layer_scalar")})
        return t

    rewrite(path, both)
    assert_same_weights(model, dgemma.DiffusionGemma.from_pretrained(path))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wanted", [torch.float32, torch.bfloat16])
def test_any_stored_dtype_loads_as_the_requested_dtype(saved, stored, wanted):
    model, path = saved
    rewrite(path, lambda t: {k: v.to(stored) for k, v in t.items()})
    loaded = dgemma.DiffusionGemma.from_pretrained(path, dtype=wanted)
    assert {p.dtype for p in loaded.model.parameters()} == {wanted}
    ref = model.model.embed_tokens.weight.to(stored).to(wanted)
    assert torch.equal(loaded.model.embed_tokens.weight, ref)


def test_missing_tensor(saved):
    _, path = saved
    rewrite(path, lambda t: {k: v for k, v in t.items() if k != "model.decoder.layers.1.router.proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.decoder.layers.1.router.proj.weight"):
        dgemma.DiffusionGemma.from_pretrained(path)


def test_unexpected_tensor(saved):
    _, path = saved
    rewrite(path, lambda t: {**t, "model.decoder.layers.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model.decoder.layers.0.mystery.weight"):
        dgemma.DiffusionGemma.from_pretrained(path)


def test_mis_shaped_tensor(saved):
    _, path = saved
    rewrite(path, lambda t: {**t, "model.decoder.layers.2.experts.down_proj": torch.zeros(8, 64, 31)})
    with pytest.raises(CheckpointError, match=r"model.decoder.layers.2.experts.down_proj: checkpoint \[8, 64, 31\], "
                                              r"model expects \[8, 64, 32\]"):
        dgemma.DiffusionGemma.from_pretrained(path)


def test_truncated_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated or corrupt safetensors file"):
        dgemma.DiffusionGemma.from_pretrained(path)


def test_missing_shard_and_weights(saved, tmp_path):
    model, path = saved
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_bytes=100_000)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in the index is missing"):
        dgemma.DiffusionGemma.from_pretrained(sharded)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        dgemma.DiffusionGemma.from_pretrained(path)


def test_config_that_is_not_diffusion_gemma(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gemma3"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type is 'gemma3': not a DiffusionGemma checkpoint"):
        dgemma.DiffusionGemma.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        dgemma.DiffusionGemma.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        dgemma.DiffusionGemma.from_pretrained(path)


@pytest.mark.parametrize("edit, message", [
    (lambda cfg: [cfg], "config.json: expected a JSON object, got list"),
    (lambda cfg: {**cfg, "text_config": [1]}, "config.json: text_config must be a JSON object, got list"),
    (lambda cfg: {**cfg, "text_config": []}, "config.json: text_config must be a JSON object, got list"),
    (lambda cfg: {**cfg, "text_config": {**cfg["text_config"], "hidden_size": "64"}},
     "config.json: text_config.hidden_size must be an integer >= 1, got '64'"),
    (lambda cfg: {**cfg, "text_config": {**cfg["text_config"], "vocab_size": 0}},
     "config.json: text_config.vocab_size must be an integer >= 1, got 0"),
    (lambda cfg: {**cfg, "canvas_length": "32"}, "config.json: canvas_length must be >= 1, got '32'"),
])
def test_config_with_wrong_shapes_or_types(saved, edit, message):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(ConfigError, match=re.escape(message)):
        dgemma.DiffusionGemma.from_pretrained(path)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_config_files_that_are_directories(saved, name):
    _, path = saved
    (path / name).unlink()
    (path / name).mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"{name}: not a file")):
        dgemma.DiffusionGemma.from_pretrained(path)


@pytest.mark.parametrize("edit,message", [
    (dict(max_new_tokens="x"), "generation_config.json: max_new_tokens must be an integer >= 1, got 'x'"),
    (dict(t_min=0.9, t_max=0.5), "generation_config.json: t_min (0.9) must not exceed t_max (0.5)"),
    (dict(eos_token_id="1"), "generation_config.json: eos_token_id must be a token id or a list of them"),
])
def test_generation_config_with_invalid_settings(saved, edit, message):
    _, path = saved
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **edit}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        dgemma.DiffusionGemma.from_pretrained(path)
    assert dgemma.cli.main(["info", str(path)]) == 1


def test_config_files_that_are_not_utf8_or_not_objects(saved):
    _, path = saved
    (path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=re.escape("generation_config.json: expected a JSON object, got list")):
        dgemma.DiffusionGemma.from_pretrained(path)
    (path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="config.json: not valid JSON .*can't decode byte 0xff"):
        dgemma.DiffusionGemma.from_pretrained(path)


def test_unknown_path_or_preset():
    with pytest.raises(FileNotFoundError, match="no such model directory .*shipped models: dgemma-code-tiny; presets, random weights: 26b-a4b, tiny"):
        dgemma.DiffusionGemma.from_pretrained("/nonexistent/model")


def test_config_json_round_trip_and_hf_reading():
    cfg = preset("26b-a4b")
    d = cfg.to_hf_dict()
    assert d["text_config"]["per_layer_config"]["5"] == {"head_dim": 512, "num_key_value_heads": 2}
    assert DiffusionGemmaConfig.from_hf_dict(d) == cfg
    # the Gemma 4 style (global_head_dim / num_global_key_value_heads) reads the same
    text = {k: v for k, v in d["text_config"].items() if k != "per_layer_config"}
    text.update(global_head_dim=512, num_global_key_value_heads=2)
    assert DiffusionGemmaConfig.from_hf_dict({**d, "text_config": text}) == cfg
    gen = GenerationConfig.from_hf_dict({"sampler_config": {"entropy_bound": 0.3, "_cls_name": "x"},
                                         "max_denoising_steps": 12, "eos_token_id": [1, 106]})
    assert (gen.entropy_bound, gen.max_denoising_steps, gen.eos_token_id) == (0.3, 12, [1, 106])


def test_26b_parameter_count_matches_the_published_size():
    counts = preset("26b-a4b").parameter_counts()
    assert 25.0e9 < counts["total"] < 26.5e9  # 25.8B published (text model; the vision tower adds ~0.4B)
    assert 3.5e9 < counts["active"] < 4.2e9  # 3.8B active


def test_parameter_count_equals_the_built_model():
    model = dgemma.DiffusionGemma.from_config(preset("tiny"))
    assert preset("tiny").parameter_counts()["total"] == sum(p.numel() for p in model.model.parameters())


@pytest.mark.parametrize("copy,shape,first", [
    ("lm_head.weight", (10, 64), "model.decoder.embed_tokens.weight"),
    ("model.encoder.language_model.layers.0.mlp.up_proj.weight", (95, 64), "model.decoder.layers.0.mlp.up_proj.weight"),
])
def test_a_mis_shaped_copy_of_a_tied_tensor(saved, copy, shape, first):
    """The first copy of a tied tensor is read; every other copy's shape is checked (its values are not read)."""
    _, path = saved
    rewrite(path, lambda t: {**t, copy: torch.zeros(shape)})
    expected = list(load_file(path / "model.safetensors")[first].shape)
    with pytest.raises(CheckpointError, match=re.escape(f"mis-shaped tensors: {copy}: checkpoint {list(shape)}, but "
                                                        f"its tied copy {first} is {expected}")):
        dgemma.DiffusionGemma.from_pretrained(path)


def _sharded(model, tmp_path):
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_bytes=100_000)
    return path, path / "model.safetensors.index.json"


def _wrong_shard(index):
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    other = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})[0]
    return {**index, "weight_map": {**index["weight_map"], name: other}}, f"{other}: has no tensor {name!r}, which " \
                                                                          f"model.safetensors.index.json maps to " \
                                                                          f"this shard"


@pytest.mark.parametrize("edit", [
    lambda index: ([1, 2], "model.safetensors.index.json: not a safetensors index (expected a JSON object whose "
                           "'weight_map' maps tensor names to shard file names)"),
    lambda index: ({"weight_map": ["a"]}, "model.safetensors.index.json: not a safetensors index"),
    lambda index: ({"weight_map": {"lm_head.weight": 3}}, "model.safetensors.index.json: not a safetensors index"),
    _wrong_shard,
])
def test_malformed_index(saved, tmp_path, capsys, edit):
    model, _ = saved
    path, index_file = _sharded(model, tmp_path)
    index, message = edit(json.loads(index_file.read_text()))
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        dgemma.DiffusionGemma.from_pretrained(path)
    assert dgemma.cli.main(["generate", "hi", "--model", str(path), "--max-new-tokens", "8", "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err


def test_max_length_survives_save_and_load(saved, tmp_path):
    """Every generation setting dgemma reads is written back, in a file transformers still reads."""
    hf = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")
    model, _ = saved
    model.generation_config = model.generation_config.updated(max_length=40, max_denoising_steps=4)
    model.save_pretrained(tmp_path / "again")
    again = dgemma.DiffusionGemma.from_pretrained(tmp_path / "again")
    assert again.generation_config == model.generation_config
    assert again.generation_config.max_length == 40
    assert hf.DiffusionGemmaGenerationConfig.from_pretrained(tmp_path / "again").max_length == 40
