"""Reading a `config.json` as transformers 5.23 does: its defaults for absent fields, `per_layer_config` without
redundant overrides, null token ids, and a refusal naming the field for what dgemma does not implement."""

from __future__ import annotations

import json
import re

import pytest
import torch

import dgemma
from dgemma import ConfigError
from dgemma.config import DiffusionGemmaConfig, TextConfig, preset
from dgemma.model.kv_cache import KVCache

SLIDING, FULL = "sliding_attention", "full_attention"
TEXT = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, global_head_dim=32, num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
            moe_intermediate_size=16, max_position_embeddings=2048, num_hidden_layers=2, sliding_window=8,
            layer_types=[SLIDING, FULL])
VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=16)


def reference_checkpoint(path, edit=None, **text):
    """A tiny checkpoint written by transformers' save_pretrained; `edit` then rewrites its text_config dict."""
    from transformers import DiffusionGemmaConfig as HFConfig, DiffusionGemmaForBlockDiffusion

    cfg = HFConfig(text_config={**TEXT, **text}, vision_config=VISION, canvas_length=8)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that each one counts
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    if edit is not None:
        d = json.loads((path / "config.json").read_text())
        edit(d["text_config"])
        (path / "config.json").write_text(json.dumps(d))
    return path


@torch.no_grad()
def assert_logits_match(path, prompt_len=12):
    """Encoder logits of a prompt and decoder logits of a canvas over it: dgemma's equal transformers'."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    ours = dgemma.DiffusionGemma.from_pretrained(path).model
    c, v = ours.config.canvas_length, ours.text.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, v, (1, prompt_len), generator=g)
    ref_cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    cache = KVCache(ours.text, 1, prompt_len + c, c)
    hidden = ref.model.encoder(input_ids=ids, past_key_values=ref_cache).last_hidden_state
    cap = ref.config.text_config.final_logit_softcapping
    expected = torch.tanh(ref.lm_head(hidden).float() / cap) * cap
    assert (ours.logits(ours.encode(ids, cache)) - expected).abs().max() <= 1e-4
    canvas = torch.randint(0, v, (1, c), generator=g)
    expected = ref(decoder_input_ids=canvas, past_key_values=ref_cache).logits
    assert (ours.denoise(canvas, cache) - expected).abs().max() <= 1e-4
    return ours


def test_absent_text_config_fields_take_transformers_defaults():
    """Each field dgemma reads, absent from the dict, has the value transformers' DiffusionGemmaTextConfig gives it
    (not the 26B model's); the MoE sizes, None there, are given."""
    from transformers import DiffusionGemmaTextConfig

    moe = dict(num_experts=4, top_k_experts=2, moe_intermediate_size=16)
    ours = TextConfig.from_hf_dict(moe)
    ref = DiffusionGemmaTextConfig(**moe)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_activation", "max_position_embeddings", "rms_norm_eps",
                 "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings", "rope_parameters",
                 "sliding_window", "layer_types", "final_logit_softcapping", "use_bidirectional_attention",
                 "attention_bias", "initializer_range"):
        assert getattr(ours, name) == getattr(ref, name), name
    full = ours.layer_types.index(FULL)
    layer = ref.per_layer_config[full]  # the full layer's resolved config
    assert (ours.layer_head_dim(full), ours.layer_kv_heads(full)) == (layer.head_dim, layer.num_key_value_heads)
    assert (ours.layer_head_dim(full), ours.layer_kv_heads(full), ours.layer_head_dim(0)) == (512, 4, 256)


def test_a_config_json_without_fields_loads_with_transformers_logits(tmp_path):
    """Fields left out of config.json: transformers' defaults, so the same logits (a 512-token sliding window,
    not the 26B model's 1024, over a longer prompt; 8 heads; full layers of head_dim 512 without per_layer_config)."""
    absent = ("sliding_window", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "use_bidirectional_attention", "per_layer_config")

    def drop(text):
        for name in absent:
            del text[name]

    path = reference_checkpoint(tmp_path, drop, sliding_window=512, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=8, global_head_dim=512, num_global_key_value_heads=None,
                                max_position_embeddings=131_072)
    assert not set(absent) & set(json.loads((path / "config.json").read_text())["text_config"])
    ours = assert_logits_match(path, prompt_len=600)
    assert ours.text.sliding_window == 512


def test_a_text_config_without_moe_sizes_is_refused(tmp_path):
    """transformers' default for num_experts is None, with which it builds no model."""
    d = preset("tiny").to_hf_dict()
    del d["text_config"]["num_experts"]
    with pytest.raises(ConfigError, match=re.escape("text_config.num_experts is missing or null: it must be an "
                                                    "integer >= 1")):
        DiffusionGemmaConfig.from_hf_dict(d)


@pytest.mark.parametrize("text", [dict(global_head_dim=16), dict(global_head_dim=16, num_global_key_value_heads=1,
                                                                 num_key_value_heads=1)])
def test_per_layer_config_without_redundant_overrides_matches_transformers(tmp_path, text):
    """transformers leaves an override equal to the global value out of per_layer_config ({} when both are): the
    full layers then take head_dim and num_key_value_heads, not 512."""
    path = reference_checkpoint(tmp_path, **text)
    per_layer = json.loads((path / "config.json").read_text())["text_config"]["per_layer_config"]
    assert all("head_dim" not in v for v in per_layer.values())
    ours = assert_logits_match(path)
    assert ours.text.layer_head_dim(1) == 16


@pytest.mark.parametrize("per_layer,message", [
    ({"1": {"head_dim": 32, "sliding_window": 4}}, "text_config.per_layer_config overrides ['sliding_window']: "
                                                    "dgemma supports per-layer head_dim and num_key_value_heads only"),
    ({"0": {"head_dim": 32}}, "text_config.per_layer_config overrides layers [0], but the full-attention layers "
                              "are [1]"),
    ([1], "text_config.per_layer_config must be a JSON object of layer index -> object of overrides"),
])
def test_per_layer_config_that_dgemma_cannot_follow_is_refused(per_layer, message):
    d = {**TEXT, "per_layer_config": per_layer}
    with pytest.raises(ConfigError, match=re.escape(message)):
        TextConfig.from_hf_dict(d)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rope_types_other_than_the_models_are_refused(rope_type):
    rope = {SLIDING: {"rope_type": rope_type, "rope_theta": 10_000.0, "factor": 4.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
    with pytest.raises(ConfigError, match=re.escape(f"text_config.rope_parameters['sliding_attention']: rope_type "
                                                    f"{rope_type!r} is not supported (dgemma implements 'default' "
                                                    f"and 'proportional')")):
        TextConfig.from_hf_dict({**TEXT, "rope_parameters": rope})


@pytest.mark.parametrize("field,value,message", [
    ("hidden_activation", "gelu", "text_config.hidden_activation 'gelu' is not supported (dgemma implements "
                                  "'gelu_pytorch_tanh')"),
    ("hidden_activation", "silu", "text_config.hidden_activation 'silu' is not supported"),
    ("use_bidirectional_attention", "all", "text_config.use_bidirectional_attention 'all' is not supported "
                                           "(dgemma implements 'vision' and null"),
])
def test_activation_and_attention_kinds_other_than_the_models_are_refused(tmp_path, field, value, message):
    config = preset("tiny")
    config.save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["text_config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=re.escape(f"config.json: {message}")):
        DiffusionGemmaConfig.load(tmp_path)


@pytest.mark.parametrize("value", [None, "vision"])
def test_bidirectional_attention_of_the_model_loads(value):
    assert TextConfig.from_hf_dict({**TEXT, "use_bidirectional_attention": value}).use_bidirectional_attention == value


def test_null_eos_in_config_json_means_no_eos(tmp_path):
    """Without generation_config.json, config.json's eos_token_id null is no EOS (as transformers reads it), and a
    bad token id names config.json, the file it came from."""
    model = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0)
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    d = json.loads((tmp_path / "config.json").read_text())
    d["text_config"]["eos_token_id"] = None
    (tmp_path / "config.json").write_text(json.dumps(d))
    loaded = dgemma.DiffusionGemma.from_pretrained(tmp_path)
    assert loaded.generation_config.eos_token_id == []
    d["text_config"]["pad_token_id"] = -1
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: text_config.pad_token_id must be "
                                                    f"null or a token id in [0, 512), got -1")):
        dgemma.DiffusionGemma.from_pretrained(tmp_path)
