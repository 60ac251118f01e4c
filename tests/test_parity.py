"""Numerical parity with the reference implementation (transformers 5.23 `diffusion_gemma`)."""

from __future__ import annotations

import json

import pytest
import torch

import dgemma
from dgemma.model.kv_cache import KVCache

pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402

TOL = 1e-4


def ref_encoder_logits(ref, ids, cache):
    hidden = ref.model.encoder(input_ids=ids, past_key_values=cache).last_hidden_state
    logits = ref.lm_head(hidden).float()
    cap = ref.config.text_config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


@pytest.mark.parametrize("name,prompt_len", [("window", 21), ("multi", 5)])
@torch.no_grad()
def test_encoder_and_decoder_logits_match(reference_checkpoint, name, prompt_len):
    path, ref = reference_checkpoint(name)
    ours = dgemma.DiffusionGemma.from_pretrained(path).model
    c, v = ours.config.canvas_length, ours.text.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, v, (2, prompt_len), generator=g)
    ref_cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    cache = KVCache(ours.text, 2, prompt_len + 3 * c, c)

    # (a) encoder: the AR logits of the causal pass
    assert (ours.logits(ours.encode(ids, cache)) - ref_encoder_logits(ref, ids, ref_cache)).abs().max() <= TOL
    for _ in range(3):  # (b) decoder over [cache ; canvas], with and without self-conditioning, canvas after canvas
        canvas = torch.randint(0, v, (2, c), generator=g)
        self_cond = torch.randn(2, c, v, generator=g) * 3
        for sc in (None, self_cond):
            expected = ref(decoder_input_ids=canvas, past_key_values=ref_cache, self_conditioning_logits=sc).logits
            assert (ours.denoise(canvas, cache, sc) - expected).abs().max() <= TOL
        committed = torch.randint(0, v, (2, c), generator=g)
        ref.model.encoder(input_ids=committed, past_key_values=ref_cache)
        ours.encode(committed, cache)


def _generate_pair(path, ref, prompt, seed, **settings):
    torch.manual_seed(seed)
    expected = ref.generate(torch.tensor([prompt]), **settings)
    ours = dgemma.DiffusionGemma.from_pretrained(path)
    torch.manual_seed(seed)
    got = ours.generate(input_ids=torch.tensor([prompt]), **settings)
    return expected, got


@pytest.mark.parametrize("name,variant,prompt_len,max_new,steps", [
    ("window", "random", 21, 32, 6),
    ("multi", "random", 5, 40, 12),
    ("window", "confident", 21, 64, 16),
    ("multi", "confident", 5, 40, 16),
])
def test_generate_reproduces_transformers_token_for_token(reference_checkpoint, name, variant, prompt_len,
                                                          max_new, steps):
    path, ref = reference_checkpoint(name, variant)
    for seed in range(3):
        prompt = [2] + torch.randint(3, 512, (prompt_len - 1,), generator=torch.Generator().manual_seed(seed)).tolist()
        expected, got = _generate_pair(path, ref, prompt, seed, max_new_tokens=max_new, max_denoising_steps=steps,
                                       eos_token_id=1, pad_token_id=0)
        assert got.sequences.tolist() == expected.sequences.tolist(), f"seed {seed}"
        assert torch.allclose(got.tokens_per_forward.double(), expected.tokens_per_forward.double(), atol=1e-6)


def test_a_generation_config_without_eos_stops_at_none_as_in_transformers(reference_checkpoint):
    """transformers' own save_pretrained writes a generation_config.json without eos_token_id, and its generate then
    never stops at an EOS; dgemma took config.json's EOS instead (a row that wrote one ended there)."""
    path, ref = reference_checkpoint("window", "confident")
    assert "eos_token_id" not in json.loads((path / "generation_config.json").read_text())
    assert dgemma.DiffusionGemma.from_pretrained(path).generation_config.eos_token_id == []
    writes_eos = 0
    for seed in (5, 6):  # seed 6 writes token 1, config.json's EOS, at its 12th place
        prompt = [2] + torch.randint(3, 512, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
        expected, got = _generate_pair(path, ref, prompt, seed, max_new_tokens=48, max_denoising_steps=10,
                                       stability_threshold=0)
        assert got.sequences.tolist() == expected.sequences.tolist(), f"seed {seed}"
        writes_eos += 1 in got.sequences[0, len(prompt):].tolist()
    assert writes_eos  # the case that differed: an EOS in the output, not a stop


@pytest.mark.parametrize("name,variant", [("window", "random"), ("multi", "confident")])
def test_generate_in_bfloat16_reproduces_transformers_token_for_token(reference_checkpoint, name, variant):
    """In bf16 the reference hands self-conditioning the scaled logits rounded to bf16; so does dgemma."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path, _ = reference_checkpoint(name, variant)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = dgemma.DiffusionGemma.from_pretrained(path, dtype=torch.bfloat16)
    prompt = torch.tensor([[2] + list(range(10, 30))])
    for seed in range(2):
        settings = dict(max_new_tokens=40, max_denoising_steps=12, eos_token_id=1, pad_token_id=0)
        torch.manual_seed(seed)
        expected = ref.generate(prompt, **settings)
        torch.manual_seed(seed)
        got = ours.generate(input_ids=prompt, **settings)
        assert got.sequences.tolist() == expected.sequences.tolist(), f"seed {seed}"


def test_confident_variant_exercises_acceptance_early_stop_and_eos(reference_checkpoint):
    """The confident weights must really take the paths the parity test is meant to cover."""
    path, _ = reference_checkpoint("window", "confident")
    model = dgemma.DiffusionGemma.from_pretrained(path)
    torch.manual_seed(0)
    out = model.generate(input_ids=torch.tensor([[2, 5, 6, 7]]), max_new_tokens=64, max_denoising_steps=16)
    assert out.tokens_per_forward.item() > 2  # many tokens accepted per pass
    assert max(max(p) for p in out.stats.passes_per_canvas) < 16  # adaptive early stop fired


def test_starting_canvas_matches_transformers(reference_checkpoint):
    path, ref = reference_checkpoint("multi", "confident")
    start = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(5))
    expected, got = _generate_pair(path, ref, [2, 9, 10], 4, max_new_tokens=16, max_denoising_steps=8,
                                   decoder_input_ids=start)
    assert got.sequences.tolist() == expected.sequences.tolist()


@torch.no_grad()
def test_dgemma_save_loads_in_transformers(reference_checkpoint, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    path, ref = reference_checkpoint("window")
    model = dgemma.DiffusionGemma.from_pretrained(path)
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)  # force several shards + index
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    caches = [DynamicCache(config=m.config.get_text_config(decoder=True)) for m in (ref, reloaded)]
    for m, cache in zip((ref, reloaded), caches):
        m.model.encoder(input_ids=ids, past_key_values=cache)
    a = ref(decoder_input_ids=canvas, past_key_values=caches[0]).logits
    b = reloaded(decoder_input_ids=canvas, past_key_values=caches[1]).logits
    assert torch.equal(a, b)
    # and dgemma reads its own shards back
    again = dgemma.DiffusionGemma.from_pretrained(tmp_path).model
    for (n, p), q in zip(model.model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), n
    assert any(n.startswith("vision_tower.") for n in again.state_dict())  # the vision tower round-trips too


def test_batch_with_rows_stopping_apart_reproduces_transformers(reference_checkpoint, monkeypatch):
    """Rows of one batch stop their canvases at different passes; dgemma leaves the stopped rows' logits,
    sampling and self-conditioning input out from then on (`denoise(rows=...)`) and still writes the reference's
    tokens."""
    path, ref = reference_checkpoint("window", "confident")
    ours = dgemma.DiffusionGemma.from_pretrained(path)
    subsets, embedded = [], []
    real, real_embed = ours.model.denoise, ours.model.embed_probs

    def spy(*args, rows=None, **kwargs):
        subsets.append(None if rows is None else rows.tolist())
        return real(*args, rows=rows, **kwargs)

    def spy_embed(probs):
        embedded.append(probs.shape[0])
        return real_embed(probs)

    monkeypatch.setattr(ours.model, "denoise", spy)
    monkeypatch.setattr(ours.model, "embed_probs", spy_embed)
    g = torch.Generator().manual_seed(3)
    prompts = torch.cat([torch.full((4, 1), 2), torch.randint(3, 512, (4, 8), generator=g)], dim=1)
    settings = dict(max_new_tokens=48, max_denoising_steps=16, eos_token_id=1, pad_token_id=0)
    for seed in range(2):
        torch.manual_seed(seed)
        expected = ref.generate(prompts, **settings)
        torch.manual_seed(seed)
        got = ours.generate(input_ids=prompts, **settings)
        assert got.sequences.tolist() == expected.sequences.tolist(), f"seed {seed}"
    assert any(s is not None and 0 < len(s) < 4 for s in subsets)  # the subset path was taken
    assert 0 < min(embedded) < 4  # some passes computed the self-conditioning input of fewer rows


class _Recorder:
    """A transformers-style streamer that records what it is given."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.tolist()))

    def put_draft(self, value):
        self.calls.append(("draft", value.tolist()))

    def end(self):
        self.calls.append(("end",))


def test_settings_objects_lengths_and_streamers_resolve_as_in_transformers(reference_checkpoint):
    """A generation_config object (transformers' or dgemma's) is layered over the checkpoint's settings, max_length
    applies only while max_new_tokens is at its default, return_dict_in_generate=False returns the tensor, and a
    streamer sees the same prompt, drafts and canvases."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    path, ref = reference_checkpoint("multi", "confident")
    ours = dgemma.DiffusionGemma.from_pretrained(path)
    prompt = torch.tensor([[2, 9, 10, 11, 12]])
    hf_config = DiffusionGemmaGenerationConfig(max_new_tokens=24, max_denoising_steps=6, eos_token_id=1)
    cases = [
        (dict(generation_config=hf_config), None),
        (dict(generation_config=hf_config), dict(generation_config=dgemma.GenerationConfig(
            max_new_tokens=24, max_denoising_steps=6, eos_token_id=1))),
        (dict(max_length=21, max_denoising_steps=6), None),  # 16 new tokens
        (dict(max_length=21, max_new_tokens=256, max_denoising_steps=6), None),  # the reference's 256 rule
        (dict(max_length=21, max_new_tokens=8, max_denoising_steps=6), None),  # max_new_tokens wins
        (dict(max_new_tokens=16, max_denoising_steps=6, return_dict_in_generate=False), None),
    ]
    for i, (settings, own_settings) in enumerate(cases):
        torch.manual_seed(i)
        ref_streamer, streamer = _Recorder(), _Recorder()
        expected = ref.generate(prompt, streamer=ref_streamer, **settings)
        torch.manual_seed(i)
        got = ours.generate(input_ids=prompt, streamer=streamer, **(own_settings or settings))
        if settings.get("return_dict_in_generate") is False:
            assert isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)
            assert got.tolist() == expected.tolist()
        else:
            assert got.sequences.tolist() == expected.sequences.tolist(), settings
        assert streamer.calls == ref_streamer.calls, settings

    # a checkpoint whose max_new_tokens is not 256 ignores max_length in both
    saved = ref.generation_config.max_new_tokens
    ref.generation_config.max_new_tokens = 16
    ours.generation_config = ours.generation_config.updated(max_new_tokens=16)
    try:
        torch.manual_seed(0)
        expected = ref.generate(prompt, max_length=40, max_denoising_steps=6)
        torch.manual_seed(0)
        got = ours.generate(input_ids=prompt, max_length=40, max_denoising_steps=6)
        assert got.sequences.shape[1] == prompt.shape[1] + 16
        assert got.sequences.tolist() == expected.sequences.tolist()
    finally:
        ref.generation_config.max_new_tokens = saved


def test_null_pad_token_id_generates_as_in_transformers(reference_checkpoint, tmp_path):
    """text_config pad_token_id null and no pad id in generation_config.json: transformers then leaves the tokens
    after a row's EOS as generated (and counts them all in tokens per forward); so does dgemma (it crashed)."""
    import shutil

    from transformers import DiffusionGemmaForBlockDiffusion

    source, _ = reference_checkpoint("window", "confident")
    path = tmp_path / "null-pad"
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["pad_token_id"] = None
    (path / "config.json").write_text(json.dumps(config))
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    assert ref.generation_config.pad_token_id is None
    assert dgemma.DiffusionGemma.from_pretrained(path).generation_config.pad_token_id is None
    kept = 0
    for seed in (5, 6):  # seed 6 writes EOS (token 1) at its 12th place, with tokens after it in that canvas
        prompt = [2] + torch.randint(3, 512, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
        expected, got = _generate_pair(path, ref, prompt, seed, max_new_tokens=48, max_denoising_steps=10,
                                       stability_threshold=0, eos_token_id=1)
        assert got.sequences.tolist() == expected.sequences.tolist(), f"seed {seed}"
        assert torch.allclose(got.tokens_per_forward.double(), expected.tokens_per_forward.double(), atol=1e-6)
        new = got.sequences[0, len(prompt):].tolist()
        kept += 1 in new and any(t != 0 for t in new[new.index(1) + 1:])
    assert kept  # the case that differs from padding: tokens after an EOS, not pad
    # a batch: a row that ends in its first canvas goes on with generated tokens, not pad, as in transformers
    g = torch.Generator().manual_seed(0)
    prompts = torch.cat([torch.full((4, 1), 2), torch.randint(3, 512, (4, 4), generator=g)], dim=1)
    ours = dgemma.DiffusionGemma.from_pretrained(path)
    settings = dict(max_new_tokens=48, max_denoising_steps=10, stability_threshold=0, eos_token_id=1)
    torch.manual_seed(1)
    expected = ref.generate(prompts, **settings)
    torch.manual_seed(1)
    got = ours.generate(input_ids=prompts, **settings)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert torch.allclose(got.tokens_per_forward.double(), expected.tokens_per_forward.double(), atol=1e-6)
    new = got.sequences[:, prompts.shape[1]:]
    ended = (new[:, :16] == 1).any(dim=1)  # 16: the canvas length
    assert ended.any() and not ended.all() and (new[ended, 16:] != 0).any()


@pytest.mark.parametrize("case", ["transformers_file", "no_file", "explicit_none"])
def test_no_pad_id_keeps_the_tokens_after_eos_as_transformers_does(reference_checkpoint, tmp_path, case):
    """Where transformers has no pad id — a generation_config.json without one (its own save_pretrained writes
    such files), no generation_config.json at all (then no EOS either), or `pad_token_id=None` in the call —
    it leaves the tokens after a row's EOS as generated. dgemma padded them with config.json's pad id."""
    import shutil

    from transformers import DiffusionGemmaForBlockDiffusion

    source, _ = reference_checkpoint("window", "confident")
    path = tmp_path / case
    shutil.copytree(source, path)
    settings = dict(max_new_tokens=48, max_denoising_steps=10, stability_threshold=0)
    if case == "no_file":
        (path / "generation_config.json").unlink()
    else:
        settings["eos_token_id"] = 1
    if case == "explicit_none":
        gen = json.loads((path / "generation_config.json").read_text())
        (path / "generation_config.json").write_text(json.dumps({**gen, "pad_token_id": 0}))
        settings["pad_token_id"] = None
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    prompt = [2] + torch.randint(3, 512, (4,), generator=torch.Generator().manual_seed(6)).tolist()
    expected, got = _generate_pair(path, ref, prompt, 6, **settings)  # seed 6 writes token 1 at its 12th place
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert torch.allclose(got.tokens_per_forward.double(), expected.tokens_per_forward.double(), atol=1e-6)
    new = got.sequences[0, len(prompt):].tolist()
    assert 1 in new and any(t != 0 for t in new[new.index(1) + 1:])  # tokens after the EOS, not pad


def test_the_checkpoints_return_dict_in_generate_is_followed(reference_checkpoint, tmp_path):
    """generation_config.json's return_dict_in_generate: false makes `generate` return the sequences tensor, as in
    transformers (dgemma ignored it); the call's argument still wins; dgemma's save keeps the setting."""
    import shutil

    from transformers import DiffusionGemmaForBlockDiffusion

    source, _ = reference_checkpoint("window", "random")
    path = tmp_path / "tensor"
    shutil.copytree(source, path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "return_dict_in_generate": False}))
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    expected, got = _generate_pair(path, ref, [2, 5, 6, 7], 0, max_new_tokens=16, max_denoising_steps=4)
    assert isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)
    assert got.tolist() == expected.tolist()
    ours = dgemma.DiffusionGemma.from_pretrained(path)
    assert not isinstance(ours.generate(input_ids=[[2, 5]], max_new_tokens=16, return_dict_in_generate=True),
                          torch.Tensor)
    ours.save_pretrained(tmp_path / "saved")
    assert dgemma.DiffusionGemma.from_pretrained(tmp_path / "saved").generation_config.return_dict_in_generate is False
