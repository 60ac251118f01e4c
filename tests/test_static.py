"""The fixed-shape decoder pass (`engine.static`, CUDA graphs on the GPU) computes what the eager pass does."""

from __future__ import annotations

import pytest
import torch

from dgemma import DiffusionGemma
from dgemma.config import preset
from dgemma.model.kv_cache import KVCache
from dgemma.engine.static import StaticDenoiser, StaticPool


@pytest.fixture(scope="module")
def tiny():
    return DiffusionGemma.from_config(preset("tiny"), seed=3)


def test_static_pass_equals_eager_pass_canvas_after_canvas(tiny):
    model, c = tiny.model, tiny.config.canvas_length
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (3, 40), generator=g)
    valid = torch.ones_like(prompts, dtype=torch.bool)
    valid[1, 25:] = False  # rows of different lengths; 40 > sliding window 16
    eager = KVCache(model.text, 3, 40 + 2 * c, c, model.dtype)
    static = KVCache(model.text, 3, 40 + 2 * c, c, model.dtype)
    den = StaticDenoiser(model, static)
    with torch.inference_mode():
        model.encode(prompts, eager, valid)
        model.encode(prompts, static, valid)
        for _ in range(2):
            den.prepare()
            canvas = torch.randint(0, 512, (3, c), generator=g)
            cond = torch.randn(3, c, 512, generator=g)
            for self_cond in (None, cond):
                want = model.denoise(canvas, eager, self_cond)
                got = den(canvas, None if self_cond is None else self_cond.softmax(-1))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            model.encode(canvas, eager)
            model.encode(canvas, static)


def test_generate_with_static_cache_gives_the_same_tokens(tiny):
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    want = tiny.generate(input_ids=ids, max_new_tokens=96, seed=[5, 6], static_cache=False)
    for _ in range(2):  # the second call reuses the pooled cache
        got = tiny.generate(input_ids=ids, max_new_tokens=96, seed=[5, 6], static_cache=True)
        assert torch.equal(got.sequences, want.sequences)
        assert got.stats.passes_per_canvas == want.stats.passes_per_canvas


def test_pool_reuses_its_cache_for_the_same_shape_and_rebuilds_for_another(tiny):
    pool = StaticPool(graph=False)
    cache, den = pool.get(tiny.model, 2, 100)
    assert cache.max_len == 256  # rounded up
    busy, _ = pool.get(tiny.model, 2, 100)  # while the first generation holds it: one of its own
    assert busy is not cache
    pool.release(busy)
    pool.release(cache)
    again, den2 = pool.get(tiny.model, 2, 200)
    assert again is cache and den2 is den and int(again.lengths.sum()) == 0
    pool.release(again)
    other, _ = pool.get(tiny.model, 3, 100)
    assert other is not cache and other.batch == 3


def test_overlapping_generations_do_not_share_the_static_cache(tiny):
    """Two streams on one model consumed in turn: each gets the tokens it gets alone (the second one used to take
    the pooled cache and reset it under the first); the pool is free again once both end, or one is closed."""
    kwargs = dict(max_new_tokens=64, max_denoising_steps=3, static_cache=True)
    prompts = {"a": [2, 10, 11, 12], "b": [2, 50, 51]}
    alone = {k: tiny.generate(input_ids=[p], seed=i, **kwargs).sequences[0].tolist()
             for i, (k, p) in enumerate(prompts.items())}
    streams = {k: tiny.stream_generate(input_ids=[p], seed=i, **kwargs) for i, (k, p) in enumerate(prompts.items())}
    last = {}
    while streams:
        for k in list(streams):
            event = next(streams[k], None)
            if event is None:
                del streams[k]
            else:
                last[k] = event
    for k, p in prompts.items():
        assert p + last[k].tokens[0] == alone[k], k
    assert not tiny._static.busy
    stream = tiny.stream_generate(input_ids=[prompts["a"]], seed=0, **kwargs)
    next(stream)
    assert tiny._static.busy
    stream.close()
    assert not tiny._static.busy
