"""The engine: cache, batching, streaming, fixed positions, EOS, errors, AR mode."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma import CanvasCommit, ConfigError, DenoiseStep, GenerationResult
from dgemma.config import preset
from dgemma.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def tiny():
    return dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0)


def prompts_of_lengths(*lengths):
    g = torch.Generator().manual_seed(0)
    return [[2] + torch.randint(3, 512, (n - 1,), generator=g).tolist() for n in lengths]


def test_batch_of_different_lengths_equals_each_prompt_alone(tiny):
    prompts = prompts_of_lengths(3, 40, 1, 17)  # around and beyond the 16-token sliding window
    seeds = [11, 12, 13, 14]
    mask = torch.zeros(4, 40, dtype=torch.long)
    ids = torch.zeros(4, 40, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as transformers' tokenizers pad for generation
        ids[i, 40 - len(p):] = torch.tensor(p)
        mask[i, 40 - len(p):] = 1
    batched = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, max_denoising_steps=6, seed=seeds)
    for i, p in enumerate(prompts):
        alone = tiny.generate(input_ids=[p], max_new_tokens=64, max_denoising_steps=6, seed=seeds[i])
        assert batched.sequences[i, 40:].tolist() == alone.sequences[0, len(p):].tolist(), f"row {i}"
        assert batched.stats.passes_per_canvas[i] == alone.stats.passes_per_canvas[0]


@pytest.mark.parametrize("static_cache", [False, True])
def test_with_rows_stopping_early_each_row_still_equals_its_prompt_alone(reference_checkpoint, static_cache):
    """Weights that stop early: rows stop at different passes, and a stopped row's generator must not advance
    while the others finish the canvas (it did, so every later canvas of that row differed from its solo run)."""
    path, _ = reference_checkpoint("window", "confident")
    model = dgemma.DiffusionGemma.from_pretrained(path)
    prompts = prompts_of_lengths(9, 4, 13, 6)
    width = max(map(len, prompts))
    ids, mask = torch.zeros(4, width, dtype=torch.long), torch.zeros(4, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    kwargs = dict(max_new_tokens=64, max_denoising_steps=16, eos_token_id=[], static_cache=static_cache)
    batched = model.generate(input_ids=ids, attention_mask=mask, seed=[11, 12, 13, 14], **kwargs)
    passes = batched.stats.passes_per_canvas
    assert len({tuple(row) for row in passes}) > 1 and max(map(max, passes)) < 16  # rows stop, at different passes
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=[p], seed=11 + i, **kwargs)
        assert batched.sequences[i, width:].tolist() == alone.sequences[0, len(p):].tolist(), f"row {i}"
        assert passes[i] == alone.stats.passes_per_canvas[0]


def test_same_seed_same_tokens_and_do_sample_false_is_deterministic(tiny):
    ids = torch.tensor([prompts_of_lengths(5)[0]])
    a = tiny.generate(input_ids=ids, max_new_tokens=32, max_denoising_steps=4, seed=3)
    b = tiny.generate(input_ids=ids, max_new_tokens=32, max_denoising_steps=4, seed=3)
    c = tiny.generate(input_ids=ids, max_new_tokens=32, max_denoising_steps=4, seed=4)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    d = tiny.generate(input_ids=ids, max_new_tokens=32, max_denoising_steps=4, do_sample=False)
    e = tiny.generate(input_ids=ids, max_new_tokens=32, max_denoising_steps=4, do_sample=False)
    assert torch.equal(d.sequences, e.sequences)


def test_stream_yields_each_step_and_each_canvas(tiny):
    events = list(tiny.stream_generate(input_ids=[[2, 7, 9]], max_new_tokens=70, max_denoising_steps=5, seed=0))
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    commits = [e for e in events if isinstance(e, CanvasCommit)]
    assert isinstance(events[-1], GenerationResult)
    assert len(commits) == 3 and len(steps) == 15  # ceil(70 / 32) canvases, no early stop with random weights
    assert steps[0].draft.shape == steps[0].accepted.shape == (1, 32)
    assert [c.canvas_index for c in commits] == [0, 1, 2]
    assert torch.equal(commits[0].tokens, steps[4].draft)  # the last draft is what gets committed
    assert events[-1].stats.passes_per_canvas == [[5, 5, 5]]
    assert events[-1].stats.tokens_per_forward == [96 / 15]


def test_fixed_positions_are_never_renoised_and_always_committed(tiny):
    c = tiny.config.canvas_length
    start = torch.randint(3, 512, (1, c), generator=torch.Generator().manual_seed(1))
    fixed = torch.zeros(1, c, dtype=torch.bool)
    fixed[0, :10] = True
    fixed[0, 20:] = True  # an infilling hole at 10..19
    events = list(tiny.stream_generate(input_ids=[[2, 5]], decoder_input_ids=start, fixed_mask=fixed,
                                       max_new_tokens=c, max_denoising_steps=8, seed=0))
    for e in events:
        if isinstance(e, (DenoiseStep, CanvasCommit)):
            tokens = e.draft if isinstance(e, DenoiseStep) else e.tokens
            assert torch.equal(tokens[fixed], start[fixed])
    hole = events[-1].tokens[0][10:20]
    assert hole != start[0, 10:20].tolist()


def test_an_eos_written_in_the_hole_pads_the_hole_but_keeps_the_fixed_suffix(tiny):
    c = tiny.config.canvas_length
    start = torch.randint(3, 512, (1, c), generator=torch.Generator().manual_seed(1))
    fixed = torch.zeros(1, c, dtype=torch.bool)
    fixed[0, :10] = True
    fixed[0, 20:] = True
    kwargs = dict(input_ids=[[2, 5]], decoder_input_ids=start, fixed_mask=fixed, max_new_tokens=c,
                  max_denoising_steps=8, seed=0)
    free = tiny.generate(**kwargs, eos_token_id=[]).sequences[0, 2:].tolist()
    at = next(i for i in range(11, 20) if free[i] not in free[:i])  # a token the model writes in the hole, first there
    out = tiny.generate(**kwargs, eos_token_id=[free[at]], pad_token_id=0).sequences[0, 2:].tolist()
    assert out[:at + 1] == free[:at + 1] and out[at + 1:20] == [0] * (19 - at)
    assert out[20:] == start[0, 20:].tolist()  # the suffix is committed (it used to become pad)


def test_tokens_after_eos_become_pad_and_rows_stop(tiny):
    ids = [[2, 5, 6]]
    free = tiny.generate(input_ids=ids, max_new_tokens=96, max_denoising_steps=3, seed=0)
    generated = free.sequences[0, 3:].tolist()
    eos = generated[40]  # pretend this token is EOS: the second canvas ends there
    first = generated.index(eos)
    out = tiny.generate(input_ids=ids, max_new_tokens=96, max_denoising_steps=3, seed=0, eos_token_id=[eos])
    got = out.sequences[0, 3:].tolist()
    canvas_end = (first // 32 + 1) * 32
    assert got[:first + 1] == generated[:first + 1]
    assert got[first + 1:] == [0] * (canvas_end - first - 1)  # pad to the end of that canvas, then stop
    assert out.stats.new_tokens == [first + 1]


def test_chunked_encoding_equals_one_prefill(tiny):
    """The ring buffer of the sliding layers and the full cache give the same states in any chunking."""
    m = tiny.model
    ids = torch.tensor(prompts_of_lengths(45))
    one = KVCache(m.text, 1, 64, 32)
    full = m.logits(m.encode(ids, one))
    chunked = KVCache(m.text, 1, 64, 32)
    parts = [m.logits(m.encode(ids[:, a:b], chunked)) for a, b in ((0, 7), (7, 8), (8, 30), (30, 45))]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    canvas = torch.randint(0, 512, (1, 32))
    assert torch.allclose(m.denoise(canvas, one), m.denoise(canvas, chunked), atol=1e-5)


def test_ar_mode_is_greedy_decoding_of_the_encoder(tiny):
    m = tiny.model
    prompt = prompts_of_lengths(12)[0]
    out = tiny.generate_ar([prompt], max_new_tokens=24, eos_token_id=[])
    seq = list(prompt)
    for _ in range(24):  # no cache: re-encode everything each time
        cache = KVCache(m.text, 1, len(seq), 1)
        seq.append(int(m.logits(m.encode(torch.tensor([seq]), cache))[0, -1].argmax()))
    assert out.sequences[0].tolist() == seq
    assert out.stats.tokens_per_forward == [1.0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_denoising_steps=0), "max_denoising_steps must be an integer >= 1"),
    (dict(num_diffusion_steps=-2), "max_denoising_steps must be an integer >= 1"),
    (dict(entropy_bound=0.0), "entropy_bound must be a number > 0"),
    (dict(entropy_bound=-1), "entropy_bound must be a number > 0"),
    (dict(t_min=0.9, t_max=0.5), "t_min (0.9) must not exceed t_max (0.5)"),
    (dict(t_min=-0.1), "t_min must be a number >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(confidence_threshold=0), "confidence_threshold must be a number > 0"),
    (dict(stability_threshold=-1), "stability_threshold must be an integer >= 0"),
    (dict(max_new_tokens=5000), "exceeds the model context of 4096"),
    (dict(max_length=2), "max_length (2) leaves no room"),
    (dict(not_a_setting=1), "unknown generation settings: ['not_a_setting']"),
    (dict(seed=[1, 2]), "got 2 seeds for a batch of 1"),
    (dict(decoder_input_ids=torch.zeros(1, 5, dtype=torch.long)), "starting canvas has shape [1, 5], expected [1, 32]"),
    (dict(fixed_mask=torch.ones(1, 32, dtype=torch.bool)), "fixed_mask needs decoder_input_ids"),
    (dict(decoder_input_ids=torch.full((1, 32), 600)), "starting canvas has token ids outside the vocabulary [0, 512)"),
    (dict(decoder_input_ids=torch.full((1, 32), -1)), "starting canvas has token ids outside the vocabulary"),
    (dict(eos_token_id="1"), "eos_token_id must be a token id or a list of them"),
    (dict(eos_token_id=[1, -3]), "eos_token_id must be a token id or a list of them"),
    (dict(pad_token_id=512), "pad_token_id 512 is outside the vocabulary [0, 512)"),
    (dict(eos_token_id=[1, 512]), "eos_token_id 512 is outside the vocabulary [0, 512)"),
    (dict(seed=1.5), "a seed must be an integer in [-2**63, 2**64), got 1.5"),
    (dict(seed=2**64), "a seed must be an integer in [-2**63, 2**64)"),
    (dict(seed=torch.tensor([1, 2])), "got 2 seeds for a batch of 1"),
    (dict(decoder_input_ids=torch.full((1, 32), 3.7)), "decoder_input_ids must hold integer token ids, got dtype"),
    (dict(generation_config=3), "generation_config must be a dgemma GenerationConfig or transformers'"),
])
def test_invalid_settings_raise_clear_errors(tiny, kwargs, message):
    with pytest.raises(ConfigError) as e:
        tiny.generate(input_ids=[[2, 5, 6]], **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("ids,message", [
    ([[]], "prompt 0 is empty"),
    ([[2, 600]], "token ids outside the vocabulary [0, 512): [600]"),
    ([[2] * 4090], "exceeds the model context of 4096"),
    (torch.tensor([[2.0, 5.5]]), "input_ids must hold integer token ids, got dtype float32"),
    ([[2, 5.5]], "input_ids must hold integer token ids"),
])
def test_invalid_prompts_raise_clear_errors(tiny, ids, message):
    for call in (tiny.generate, tiny.generate_ar):
        with pytest.raises(ConfigError) as e:
            call(input_ids=ids, max_new_tokens=32)
        assert message in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eos_token_id=600), "eos_token_id 600 is outside the vocabulary [0, 512)"),
    (dict(temperature=float("nan")), "temperature must be 0 (greedy) or in [1e-06, 1e+06], got nan"),
    (dict(temperature=-1.0), "temperature must be 0 (greedy)"),
    (dict(seed=[1, 2]), "got 2 seeds for a batch of 1"),
])
def test_invalid_ar_settings_raise_clear_errors(tiny, kwargs, message):
    with pytest.raises(ConfigError) as e:
        tiny.generate_ar([[2, 5, 6]], max_new_tokens=4, **kwargs)
    assert message in str(e.value)


def test_ar_counts_each_rows_own_forwards(tiny):
    """A row that ends at its first token made one forward, not as many as the longest row of its batch."""
    prompts = [[2, 5, 6], [2, 9, 10, 11]]
    free = tiny.generate_ar(prompts[1:], max_new_tokens=6, eos_token_id=[]).sequences[0, 4:].tolist()
    eos = next(t for t in free if t not in tiny.generate_ar(prompts[:1], max_new_tokens=6, eos_token_id=[])
               .sequences[0, 3:].tolist())
    at = free.index(eos)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    ids = torch.tensor([[0, 2, 5, 6], [2, 9, 10, 11]])
    out = tiny.generate_ar(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[eos])
    assert out.stats.decoder_passes == [6, at + 1]
    assert out.stats.tokens_per_forward == [1.0, 1.0]


def test_an_explicit_eos_token_id_none_turns_stopping_at_eos_off_as_in_transformers(tiny):
    free = tiny.generate([[2, 5, 6]], max_new_tokens=64, max_denoising_steps=3, seed=0, eos_token_id=[])
    eos = free.sequences[0, 3 + 5].item()  # a token the model writes: made the checkpoint's EOS
    original = tiny.generation_config
    tiny.generation_config = original.updated(eos_token_id=[eos])
    try:
        stopped = tiny.generate([[2, 5, 6]], max_new_tokens=64, max_denoising_steps=3, seed=0)
        unstopped = tiny.generate([[2, 5, 6]], max_new_tokens=64, max_denoising_steps=3, seed=0, eos_token_id=None)
    finally:
        tiny.generation_config = original
    assert not torch.equal(stopped.sequences, free.sequences)
    assert torch.equal(unstopped.sequences, free.sequences)


@pytest.mark.parametrize("ids", [torch.zeros(0, 5, dtype=torch.long), []])
def test_an_empty_batch_is_refused(tiny, ids):
    for call in (tiny.generate, tiny.generate_ar):
        with pytest.raises(ConfigError, match="no prompts given"):
            call(input_ids=ids, max_new_tokens=32)


def test_a_flat_list_and_a_tensor_of_eos_ids_are_taken_as_transformers_takes_them(tiny):
    flat = tiny.generate(input_ids=[2, 5, 6], max_new_tokens=32, seed=0, eos_token_id=torch.tensor([1, 7]))
    rows = tiny.generate(input_ids=[[2, 5, 6]], max_new_tokens=32, seed=0, eos_token_id=[1, 7])
    assert flat.sequences.tolist() == rows.sequences.tolist()
    assert tiny.generate_ar([2, 5, 6], max_new_tokens=4).sequences.tolist() == \
        tiny.generate_ar([[2, 5, 6]], max_new_tokens=4).sequences.tolist()


def test_a_generation_config_object_keeps_the_checkpoint_settings_it_does_not_set(tiny):
    """Fields a GenerationConfig leaves at their defaults come from the model's own generation config (its EOS,
    its step budget), as transformers layers them."""
    saved = tiny.generation_config
    tiny.generation_config = saved.updated(max_denoising_steps=3, eos_token_id=[7])
    try:
        out = tiny.generate(input_ids=[[2, 5, 6]], seed=0, generation_config=dgemma.GenerationConfig(max_new_tokens=64))
        same = tiny.generate(input_ids=[[2, 5, 6]], seed=0, max_new_tokens=64)
    finally:
        tiny.generation_config = saved
    assert out.sequences.tolist() == same.sequences.tolist()
    assert max(out.stats.passes_per_canvas[0]) <= 3


@pytest.mark.parametrize("dtype", ["fp16", "int8", torch.int64])
def test_a_weight_dtype_that_is_not_a_float_type_is_refused(dtype):
    with pytest.raises(ConfigError, match="dtype must be one of float32, bfloat16, float16"):
        dgemma.DiffusionGemma.from_pretrained("tiny", dtype=dtype)


def test_generation_leaves_stopped_rows_logits_out_only_where_the_check_allows(monkeypatch):
    """With `vocab_rows_exact` saying no, every pass computes every row's logits and self-conditioning input;
    the tokens are the same."""
    from pathlib import Path

    model = dgemma.DiffusionGemma.from_pretrained(Path(__file__).resolve().parents[1] / "models" / "dgemma-code-tiny")
    subsets = []
    real = model.model.denoise

    def spy(*args, rows=None, **kwargs):
        subsets.append(rows is not None)
        return real(*args, rows=rows, **kwargs)

    embedded = []
    real_embed = model.model.embed_probs

    def spy_embed(probs):
        embedded.append(probs.shape[0])
        return real_embed(probs)

    from dgemma.engine import generate as generation

    real_self_conditioning = generation._self_conditioning

    def checked(model_, probs, before, frozen, canvas):  # every pass's input is that of the rows' current probs
        soft = real_self_conditioning(model_, probs, before, frozen, canvas)
        assert (soft is None) == (probs is None)
        assert soft is None or torch.equal(soft, real_embed(probs))
        return soft

    monkeypatch.setattr(model.model, "denoise", spy)
    monkeypatch.setattr(model.model, "embed_probs", spy_embed)
    monkeypatch.setattr(generation, "_self_conditioning", checked)
    ids = torch.randint(3, 4096, (4, 12), generator=torch.Generator().manual_seed(0))
    prompts = torch.cat([torch.full((4, 1), 2), ids], dim=1)
    outs = []
    for allowed in (True, False):
        monkeypatch.setattr(model.model, "vocab_rows_exact", lambda rows, of, allowed=allowed: allowed)
        subsets.clear()
        embedded.clear()
        torch.manual_seed(0)
        outs.append(model.generate(input_ids=prompts, max_new_tokens=64, max_denoising_steps=12, eos_token_id=[]))
        assert any(subsets) == allowed
        assert (min(embedded) < 4) == allowed
    assert outs[0].sequences.tolist() == outs[1].sequences.tolist()
    assert outs[0].stats.passes_per_canvas == outs[1].stats.passes_per_canvas
