"""The continuous-batching scheduler: batched tokens equal each request alone, slots, queue, cancel, errors."""

from __future__ import annotations

import asyncio

import pytest
import torch

import dgemma
from dgemma import ConfigError
from dgemma.config import preset
from dgemma.model.kv_cache import KVCache
from dgemma.engine.generate import CanvasCommit, CanvasSpec, DenoiseStep, GenerationResult, stream_generate
from dgemma.engine.scheduler import (AsyncStreams, QueueFull, Request, RequestFailed, Scheduler, slot_bytes,
                                     slots_for_budget)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # microsecond matmuls: extra threads only contend on a busy machine
    yield dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0)
    torch.set_num_threads(threads)


def _prompt(n: int, seed: int) -> list[int]:
    return [2] + torch.randint(3, 512, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def _requests(tiny) -> list[Request]:
    """16 requests: prompts around and beyond the 16-token sliding window, 1 to 3 canvases, 2 to 6 steps,
    some greedy, some ending at a pretend EOS, one infilling through fixed positions."""
    base = tiny.generation_config
    c = tiny.config.canvas_length
    out = []
    for i in range(16):
        gen = base.updated(max_new_tokens=[20, 32, 64, 96][i % 4], max_denoising_steps=2 + i % 5,
                           do_sample=i % 7 != 3, eos_token_id=list(range(300, 300 + 2 * i)) if i % 3 == 0 else [])
        out.append(Request(_prompt([1, 3, 5, 15, 16, 17, 40, 70][i % 8] + i, i), gen, seed=100 + i))
    fixed = torch.zeros(1, c, dtype=torch.bool)
    fixed[0, 20:] = True
    out[5].start = CanvasSpec(torch.randint(3, 512, (1, c), generator=torch.Generator().manual_seed(9)), fixed)
    return out


def _alone(tiny, r: Request) -> list:
    return list(stream_generate(tiny.model, [r.prompt], r.gen, [torch.Generator().manual_seed(r.seed)], r.start))


@pytest.fixture(scope="module")
def reference(tiny):
    return [_alone(tiny, r) for r in _requests(tiny)]


def _run(scheduler: Scheduler, requests: list[Request]) -> list[list]:
    events: list[list] = [[] for _ in requests]
    scheduler.submit(requests, lambda i, e: events[i].append(e))
    while scheduler.step():
        pass
    return events


def _commits(events) -> list[list[int]]:
    return [e.tokens[0].tolist() for e in events if isinstance(e, CanvasCommit)]


@pytest.mark.parametrize("slots", [16, 5])
def test_each_request_gets_the_tokens_it_gets_alone(tiny, reference, slots):
    """16 slots: all run together; 5 slots: requests join and leave between steps as others finish."""
    requests = _requests(tiny)
    for r in requests[::2]:
        r.include_drafts = True
    scheduler = Scheduler(tiny.model, slots=slots, max_len=200, max_queue=16)
    got = _run(scheduler, requests)
    assert any(ref[-1].stats.new_tokens[0] < r.gen.max_new_tokens for ref, r in zip(reference, requests)), \
        "some request should end at its EOS"
    for i, (events, ref) in enumerate(zip(got, reference)):
        result = events[-1]
        assert isinstance(result, GenerationResult), i
        assert result.tokens == ref[-1].tokens, f"request {i}"
        assert result.stats.passes_per_canvas == ref[-1].stats.passes_per_canvas
        assert result.stats.tokens_per_forward == ref[-1].stats.tokens_per_forward
        assert _commits(events) == _commits(ref)
        drafts = [e.draft.tolist() for e in events if isinstance(e, DenoiseStep)]
        assert drafts == ([e.draft.tolist() for e in ref if isinstance(e, DenoiseStep)] if i % 2 == 0 else [])
    assert scheduler.active_requests == 0 and int(scheduler.cache.lengths.max()) == 0


def test_cancel_frees_the_slot_before_the_next_step(tiny):
    gen = tiny.generation_config.updated(max_new_tokens=96, max_denoising_steps=8)
    scheduler = Scheduler(tiny.model, slots=1, max_len=128, max_queue=2)
    long, short, queued = (Request(_prompt(5, k), gen, seed=k) for k in range(3))
    events: list[list] = [[], [], []]
    scheduler.submit([long, short, queued], lambda i, e: events[i].append(e))
    for _ in range(3):
        scheduler.step()
    assert scheduler.active_requests == 1 and scheduler.queue_depth == 2
    scheduler.cancel(queued.id)  # waiting: leaves the queue at once
    assert scheduler.queue_depth == 1 and events[2] == [RequestFailed("cancelled")]
    scheduler.cancel(long.id)
    scheduler.step()  # the cancelled row is gone and `short` took its slot in this very step
    assert events[0][-1] == RequestFailed("cancelled")
    assert scheduler.active_requests == 1 and scheduler.queue_depth == 0
    while scheduler.step():
        pass
    assert events[1][-1].tokens == _alone(tiny, short)[-1].tokens


def test_queue_is_bounded_and_submission_is_all_or_nothing(tiny):
    gen = tiny.generation_config.updated(max_new_tokens=32, max_denoising_steps=2)
    scheduler = Scheduler(tiny.model, slots=1, max_len=64, max_queue=1)
    scheduler.submit([Request([2, 7], gen, seed=0)], lambda i, e: None)
    with pytest.raises(QueueFull):
        scheduler.submit([Request([2, 7], gen, seed=1), Request([2, 7], gen, seed=2)], lambda i, e: None)
    assert scheduler.queue_depth == 1
    scheduler.submit([Request([2, 7], gen, seed=1)], lambda i, e: None)  # one slot + one queue place
    with pytest.raises(QueueFull):
        scheduler.submit([Request([2, 7], gen, seed=2)], lambda i, e: None)


@pytest.mark.parametrize("prompt,settings,message", [
    ([2] * 40, dict(max_new_tokens=64), "needs 72 cached tokens; this server holds at most 64"),
    ([2, 600], dict(), "token ids outside the vocabulary"),
    ([], dict(), "prompt 0 is empty"),
    ([2], dict(t_min=0.9, t_max=0.5), "t_min (0.9) must not exceed t_max (0.5)"),
])
def test_invalid_requests_are_refused_at_submission(tiny, prompt, settings, message):
    scheduler = Scheduler(tiny.model, slots=1, max_len=64, max_queue=1)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scheduler.submit([Request(prompt, tiny.generation_config.updated(**settings), seed=0)], lambda i, e: None)
    assert scheduler.queue_depth == 0


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on(tiny, monkeypatch):
    gen = tiny.generation_config.updated(max_new_tokens=32, max_denoising_steps=2)
    scheduler = Scheduler(tiny.model, slots=2, max_len=64, max_queue=4)
    forward = tiny.model.forward
    calls = iter([RuntimeError("boom")])

    def flaky(*args, **kwargs):
        error = next(calls, None)
        if error is not None:
            raise error
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", flaky)
    scheduler.start()
    try:
        first = list(scheduler.stream(Request([2, 5], gen, seed=0)))
        second = list(scheduler.stream(Request([2, 5], gen, seed=0)))
    finally:
        scheduler.stop()
    assert first == [RequestFailed("error", "engine error: RuntimeError: boom")]
    assert isinstance(second[-1], GenerationResult)
    assert not scheduler.running


def test_async_streams_from_the_background_thread(tiny):
    gen = tiny.generation_config.updated(max_new_tokens=64, max_denoising_steps=3, eos_token_id=[])
    requests = [Request(_prompt(4 + 9 * k, k), gen, seed=k) for k in range(3)]
    scheduler = Scheduler(tiny.model, slots=2, max_len=128, max_queue=4)

    async def collect() -> dict[int, list]:
        streams = AsyncStreams(scheduler, requests)
        got: dict[int, list] = {0: [], 1: [], 2: []}
        async for i, event in streams.events(timeout_s=60):
            got[i].append(event)
        return got

    scheduler.start()
    try:
        got = asyncio.run(collect())
    finally:
        scheduler.stop()
    for i, r in enumerate(requests):
        assert got[i][-1].tokens == _alone(tiny, r)[-1].tokens
        assert [type(e) for e in got[i]] == [CanvasCommit, CanvasCommit, GenerationResult]


def test_slots_follow_the_kv_cache_budget(tiny):
    text, c = tiny.model.text, tiny.config.canvas_length
    cache = KVCache(text, 3, 300, c)
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert slot_bytes(text, 300, c, torch.float32) * 3 == allocated
    per_slot = slot_bytes(text, 300, c, torch.float32)
    assert slots_for_budget(text, 300, c, torch.float32, 5 * per_slot + 1, max_slots=16) == 5
    assert slots_for_budget(text, 300, c, torch.float32, 50 * per_slot, max_slots=16) == 16
    with pytest.raises(ConfigError, match="holds no slot"):
        slots_for_budget(text, 300, c, torch.float32, per_slot - 1, max_slots=16)


def test_a_prompt_longer_than_a_canvas_is_encoded_without_the_canvases(tiny):
    """Rows are padded to the widest row: a long new prompt runs alone instead of widening every canvas."""
    gen = tiny.generation_config.updated(max_new_tokens=64, max_denoising_steps=4)
    scheduler = Scheduler(tiny.model, slots=3, max_len=128, max_queue=2)
    scheduler.submit([Request(_prompt(5, 0), gen, seed=0)], lambda i, e: None)
    scheduler.step()
    scheduler.step()
    scheduler.submit([Request(_prompt(70, 1), gen, seed=1), Request(_prompt(3, 2), gen, seed=2)], lambda i, e: None)
    scheduler.step()
    assert scheduler.batch_size == 2  # the two new prompts; the canvas waits
    scheduler.step()
    assert scheduler.batch_size == 3
