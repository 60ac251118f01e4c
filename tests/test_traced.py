"""Canvas passes replayed from TorchScript traces (`dgemma.model.traced`) are the eager passes, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import dgemma
from dgemma.model import traced
from dgemma.model.kv_cache import KVCache
from dgemma.engine.autoregressive import generate_ar
from dgemma.engine.generate import generate

SHIPPED = "models/dgemma-code-tiny"


def traced_on_second_use(m):
    m._passes.trace_after = 2
    return m


def traces(m, which: str = "canvas") -> int:
    """How many traces of `which` pass ("canvas" or "encoder") the model holds."""
    return sum(not isinstance(entry, int) for key, entry in m._passes._traces.items() if key[0] == which)


def eager_and_traced(m, canvas, cache, probs):
    """The eager pass, then the same pass three times with tracing on (first use, trace, replay)."""
    m.trace_passes = False
    want = m.denoise(canvas, cache, self_cond_probs=probs)
    m.trace_passes = True
    got = [m.denoise(canvas, cache, self_cond_probs=probs) for _ in range(3)]
    return want, got


@pytest.mark.parametrize("lengths", [[70], [5, 70, 140]], ids=["one row", "rows of different lengths"])
def test_one_trace_serves_every_canvas_as_the_cache_grows(lengths):
    """The cache grows by a canvas between rounds (the 128-token sliding window fills up on the way); the trace
    recorded in the first round replays the eager pass exactly in every round. Rows of different lengths need
    attention masks, which are arguments of the trace too."""
    m = traced_on_second_use(dgemma.DiffusionGemma.from_pretrained(SHIPPED).model)
    g = torch.Generator().manual_seed(0)
    b, c = len(lengths), m.config.canvas_length
    prompts = torch.randint(3, 4096, (b, max(lengths)), generator=g)
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    cache = KVCache(m.text, b, 400, c)
    with torch.inference_mode():
        m.encode(prompts, cache, valid)
        for _ in range(4):
            canvas = torch.randint(0, 4096, (b, c), generator=g)
            probs = torch.randn(b, c, 4096, generator=g).softmax(-1)
            want, got = eager_and_traced(m, canvas, cache, probs)
            assert all(torch.equal(x, want) for x in got)
            m.encode(torch.randint(3, 4096, (b, c), generator=g), cache)
    assert traces(m) == 1


@pytest.mark.parametrize("lengths", [[9], [3, 150]], ids=["one row", "rows of different lengths"])
def test_encoder_trace_writes_the_cache_as_the_eager_pass(lengths):
    """Autoregressive steps (one token per row) and commits (a canvas per row), traced and eager side by side on
    two caches: hidden states, every cache buffer, the slots' positions and the lengths stay equal, before and
    after the sliding window (128) fills up, the passes that record a trace included."""
    m = traced_on_second_use(dgemma.DiffusionGemma.from_pretrained(SHIPPED).model)
    g = torch.Generator().manual_seed(2)
    b, c = len(lengths), m.config.canvas_length
    prompts = torch.randint(3, 4096, (b, max(lengths)), generator=g)
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    caches = [KVCache(m.text, b, 400, c) for _ in range(2)]
    steps = [1] * 6 + [c] * 4 + [1] * 3
    with torch.inference_mode():
        for i, n in enumerate([None] + steps):
            tokens = prompts if n is None else torch.randint(3, 4096, (b, n), generator=g)
            out = []
            for cache, enabled in zip(caches, (False, True)):
                m.trace_passes = enabled
                out.append(m.encode(tokens, cache, valid if n is None else None))
            assert torch.equal(out[0], out[1]), i
            for x, y in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
                assert torch.equal(x, y), i
            assert torch.equal(caches[0].lengths, caches[1].lengths)
            assert all(torch.equal(caches[0].slot_pos[k], caches[1].slot_pos[k]) for k in caches[0].slot_pos)
    assert traces(m, "encoder") == 2  # one token per row, a canvas per row


def test_fused_commit_trace_is_the_eager_pass():
    """`commit_and_denoise` traced and eager on two caches, canvas after canvas (rows of different lengths, the
    sliding window filling up): logits and every cache buffer equal, the recording pass included."""
    m = traced_on_second_use(dgemma.DiffusionGemma.from_pretrained(SHIPPED).model)
    g = torch.Generator().manual_seed(3)
    lengths, c = [20, 100], m.config.canvas_length
    prompts = torch.randint(3, 4096, (2, max(lengths)), generator=g)
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    caches = [KVCache(m.text, 2, 400, c) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            m.encode(prompts, cache, valid)
        for i in range(5):
            committed, canvas = (torch.randint(3, 4096, (2, c), generator=g) for _ in range(2))
            out = []
            for cache, enabled in zip(caches, (False, True)):
                m.trace_passes = enabled
                out.append(m.commit_and_denoise(committed, canvas, cache))
            assert torch.equal(out[0], out[1]), i
            for x, y in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
                assert torch.equal(x, y), i
            assert torch.equal(caches[0].lengths, caches[1].lengths)
    assert traces(m, "commit") >= 1  # one per mask layout: the sliding mask goes once both windows are full


def test_hooks_run_and_replaced_weights_are_used():
    """A trace skips hooks and holds the weights it was recorded with: with hooks registered the eager pass runs,
    and a replaced parameter (or one moved to new storage) drops the traces; in-place updates need nothing."""
    m = traced_on_second_use(dgemma.DiffusionGemma.from_pretrained(SHIPPED).model)
    g = torch.Generator().manual_seed(1)
    cache = KVCache(m.text, 1, 100, 32)
    canvas, probs = torch.randint(0, 4096, (1, 32), generator=g), torch.randn(1, 32, 4096, generator=g).softmax(-1)
    down = m.layers[0].mlp.down_proj
    with torch.inference_mode():
        m.encode(torch.randint(3, 4096, (1, 40), generator=g), cache)
        before, _ = eager_and_traced(m, canvas, cache, probs)
        assert traces(m) == 1
        calls = []
        handle = m.layers[0].mlp.register_forward_hook(lambda *args: calls.append(1))
        m.denoise(canvas, cache, self_cond_probs=probs)
        handle.remove()
        assert calls == [1]

        changes = [lambda: setattr(down, "weight", nn.Parameter(down.weight * 2, requires_grad=False)),
                   lambda: setattr(down.weight, "data", down.weight.data * 0.25),
                   lambda: down.weight.mul_(3)]
        for change in changes:
            change()
            want, got = eager_and_traced(m, canvas, cache, probs)
            assert not torch.equal(want, before)
            assert all(torch.equal(x, want) for x in got)
            before = want


def test_generation_gives_the_same_tokens_with_traces_or_without():
    dg = dgemma.DiffusionGemma.from_pretrained(SHIPPED)
    traced_on_second_use(dg.model)
    prompts = [[5, 6, 7, 8, 9] * 4, [11, 12, 13]]  # different lengths: masked attention on the first canvases
    gen = dataclasses.replace(dg.generation_config, max_new_tokens=96, eos_token_id=[])
    runs = []
    for enabled in (False, True, True):
        dg.model.trace_passes = enabled
        torch.manual_seed(0)
        runs.append(generate(dg.model, prompts, gen).tokens)
    assert traces(dg.model) >= 1
    assert runs[0] == runs[1] == runs[2]
    ar = []
    for enabled in (False, True):
        dg.model.trace_passes = enabled
        ar.append(generate_ar(dg.model, prompts, 40, [], None).tokens)
    assert traces(dg.model, "encoder") >= 1
    assert ar[0] == ar[1]


def test_a_signature_is_traced_on_its_eighth_use():
    """Short runs stay eager: recording a trace costs as much as ~20 passes save."""
    m = dgemma.DiffusionGemma.from_pretrained(SHIPPED).model
    cache = KVCache(m.text, 1, 100, 32)
    canvas = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        m.encode(canvas, cache)
        for _ in range(7):
            m.denoise(canvas, cache)
        assert traces(m) == 0
        m.denoise(canvas, cache)
        assert traces(m) == 1


def test_traces_are_capped_and_prefills_stay_eager(monkeypatch):
    """A recorded trace keeps memory for the life of the process, so their number is capped (no eviction and
    re-recording) and a prompt's prefill, whose token count changes from call to call, is never traced."""
    monkeypatch.setattr(traced, "_MAX_TRACES", 1)
    m = traced_on_second_use(dgemma.DiffusionGemma.from_pretrained(SHIPPED).model)
    with torch.inference_mode():
        for b in (1, 2):
            cache = KVCache(m.text, b, 100, 32)
            for _ in range(3):
                m.encode(torch.randint(3, 4096, (b, 20)), cache)  # 20 tokens: a prefill's shape
            canvas = torch.randint(0, 4096, (b, 32))
            want, got = eager_and_traced(m, canvas, cache, None)
            assert all(torch.equal(x, want) for x in got)
    assert traces(m) == 1 and traces(m, "encoder") == 0
