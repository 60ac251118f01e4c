"""Continuous batching: many requests share one KV cache and one forward pass per engine step.

Each admitted request owns a cache row (a slot). An engine step runs ONE `model.forward` over the active
rows: rows with tokens to encode (their prompt, or the canvas they just committed) are causal encoder rows,
the others denoise their canvas, and every row keeps its own cache length, so requests join and leave
between steps. A request draws from its own seeded generator in exactly the order `stream_generate` does
for one prompt, so its tokens do not depend on what else is running.

Active requests sit in slots 0..n-1: when one finishes, the last row moves into its slot, so a step
computes the active rows only (a prefix view of the cache), never idle slots. Admission control is the
number of slots, which a KV-cache memory budget fixes (`slots_for_budget`); beyond that, a bounded queue.

The loop runs in a background thread (`start`); `submit` and `cancel` are thread-safe, events reach each
caller through a callback from the engine thread, and `AsyncStreams` reads them from asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..config import FULL, ConfigError, GenerationConfig, TextConfig
from ..model.kv_cache import KVCache
from ..model.model import DiffusionGemmaModel
from ..sampling import CanvasRNG
from ..sampling.constraint import CanvasConstraint
from ..sampling.step import CanvasState, denoise_update
from .generate import (CanvasCommit, CanvasSpec, DenoiseStep, GenerationResult, GenerationStats, _pad_after_eos,
                       _validate, count_new_tokens)
from .media import PromptMedia, batch_media, check_media, prompt_media

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at capacity: retry later."""


class ShuttingDown(RuntimeError):
    """The scheduler is stopping: it takes no new requests."""


@dataclass
class RequestFailed:
    """Terminal event of a request that did not finish: `cancelled`, `error` (the engine step failed), or
    `shutdown` (the scheduler stopped before it finished)."""

    reason: str
    message: str = ""


Event = DenoiseStep | CanvasCommit | GenerationResult | RequestFailed
EventCallback = Callable[[int, Event], None]  # (index of the request in its `submit` call, event)


@dataclass
class Request:
    """One generation: a prompt, its sampler settings and its seed. `start` ([1, C]) starts the first canvas.
    `media`: the prompt's images and video frames under `generate`'s names (`pixel_values`, `image_position_ids`,
    `mm_token_type_ids`, `pixel_values_videos`, `video_position_ids`); the tower runs on them at the prefill."""

    prompt: list[int]
    gen: GenerationConfig
    seed: int
    start: CanvasSpec | None = None
    include_drafts: bool = False  # emit a `DenoiseStep` per pass, not only the commits
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    media: dict | None = None
    constraint: CanvasConstraint | None = None  # the output's grammar (its state: one per request, never shared)


def slot_bytes(text: TextConfig, max_len: int, canvas_length: int, dtype: torch.dtype) -> int:
    """Memory of one KV-cache row (keys and values of every layer) as `KVCache` allocates it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for i, kind in enumerate(text.layer_types):
        held = max_len if kind == FULL else min(text.sliding_window - 1, max_len)
        total += 2 * text.layer_kv_heads(i) * (held + canvas_length) * text.layer_head_dim(i) * itemsize
    return total


def slots_for_budget(text: TextConfig, max_len: int, canvas_length: int, dtype: torch.dtype,
                     budget_bytes: int, max_slots: int) -> int:
    """How many rows of `max_len` tokens fit `budget_bytes` (at most `max_slots`); raises if not even one."""
    per_slot = slot_bytes(text, max_len, canvas_length, dtype)
    slots = min(max_slots, budget_bytes // per_slot)
    if slots < 1:
        raise ConfigError(f"a KV-cache budget of {budget_bytes / 2**30:.2f} GiB holds no slot of {max_len} tokens "
                          f"({per_slot / 2**30:.2f} GiB each)")
    return slots


_FEATURES = "prompt_media"  # where a request's media dict keeps its soft tokens once computed


def _media_kwargs(media: dict) -> dict:
    """`prompt_media`'s arguments of one request's media: the type ids as its one row."""
    kwargs = {k: v for k, v in media.items() if k != _FEATURES}
    types = kwargs.pop("mm_token_type_ids", None)
    if types is not None:
        types = torch.as_tensor(types)
        kwargs["mm_token_type_ids"] = (types[None] if types.dim() == 1 else types).tolist()
    return kwargs


def _deliver(on_event: Callable[[Event], None], event: Event) -> bool:
    """Hand an event to its reader; False when that fails (e.g. the reader's event loop has closed)."""
    try:
        on_event(event)
    except Exception:
        log.warning("event delivery failed", exc_info=True)
        return False
    return True


class _Row:
    """An admitted request: where it is in its canvas loop (the per-request half of `stream_generate`)."""

    def __init__(self, request: Request, on_event: Callable[[Event], None], model: DiffusionGemmaModel,
                 submitted: float):
        gen = request.gen
        self.request, self.on_event, self.submitted = request, on_event, submitted
        self.c, self.vocab, self.device = model.config.canvas_length, model.text.vocab_size, model.device
        self.dtype = model.dtype
        self.n_canvases = math.ceil(gen.max_new_tokens / self.c)
        self.pad = gen.pad_token_id  # None: tokens after EOS stay as generated, as in `generate`
        self.eos = torch.tensor(gen.eos_token_id or [], dtype=torch.long, device=self.device)
        self.rng = CanvasRNG([torch.Generator(self.device).manual_seed(request.seed)])
        self.pending: torch.Tensor | None = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        self.state: CanvasState | None = None
        self.canvas_index = self.step = self.passes = 0
        self.committed: list[torch.Tensor] = []
        self.stats = GenerationStats(passes_per_canvas=[[]])
        self.done = False

    def prefill_media(self, model: DiffusionGemmaModel) -> PromptMedia | None:
        """The prompt's soft tokens, computed at the prefill; requests sharing one media dict (the choices of one
        API request) run the tower once, the first of them, and keep the result there."""
        media, self.request.media = self.request.media, None
        if not media:
            return None
        if _FEATURES not in media:
            found = prompt_media(model, [self.request.prompt], **_media_kwargs(media))
            media[_FEATURES] = None if found is None else found[0]
        return media[_FEATURES]

    def emit(self, event: Event) -> None:
        if not _deliver(self.on_event, event):
            self.done = True  # the reader is gone: stop working for it

    def start_canvas(self) -> None:
        """After the encoder pass: noise (drawn even when a canvas is given, as the reference does)."""
        canvas = self.rng.tokens(1, self.c, self.vocab, self.device)
        start, fixed = self.request.start if self.canvas_index == 0 else None, None
        if start is not None:
            canvas = start.tokens.to(self.device)
            fixed = start.fixed.to(self.device) if start.fixed is not None else None
        constraints = None if self.request.constraint is None else [self.request.constraint]
        self.state = CanvasState.start(canvas, self.request.gen, fixed, self.dtype, constraints)
        self.pending, self.step, self.passes = None, 0, 0

    def denoised(self, logits: torch.Tensor) -> None:
        """Advance by one decoder pass given this row's logits [1, C, V]; commit when the canvas is done."""
        gen, state = self.request.gen, self.state
        steps_left = gen.max_denoising_steps - self.step
        accepted = denoise_update(state, logits, steps_left, gen, self.rng)
        self.step += 1
        self.passes += 1
        if self.request.include_drafts:
            self.emit(DenoiseStep(self.canvas_index, self.step, state.draft.cpu(), accepted.cpu(), (~state.done).cpu()))
        if bool(state.done[0]) or steps_left == 1:
            self.commit()

    def commit(self) -> None:
        tokens, has_eos = _pad_after_eos(self.state.draft, self.eos, self.pad, self.state.fixed)
        if self.request.constraint is not None:
            self.request.constraint.commit(tokens[0].tolist())
        self.committed.append(tokens)
        self.stats.passes_per_canvas[0].append(self.passes)
        if self.canvas_index == 0:
            self.stats.first_canvas_s = time.perf_counter() - self.submitted
        finished = bool(has_eos[0])
        self.emit(CanvasCommit(self.canvas_index, tokens.cpu(), has_eos.cpu(), torch.tensor([self.passes])))
        self.canvas_index += 1
        self.state = None
        if finished or self.canvas_index == self.n_canvases:
            self.finish()
        else:
            self.pending = tokens

    def finish(self) -> None:
        out = torch.cat(self.committed, dim=1)
        stats = self.stats
        stats.new_tokens = count_new_tokens(out, self.pad)
        stats.decoder_passes = [sum(stats.passes_per_canvas[0])]
        stats.tokens_per_forward = [stats.new_tokens[0] / max(stats.decoder_passes[0], 1)]
        stats.wall_time_s = time.perf_counter() - self.submitted
        constraint = self.request.constraint
        stats.grammar_complete = [None if constraint is None else constraint.complete]
        self.emit(GenerationResult(out.tolist(), stats))
        self.done = True


class Scheduler:
    """Continuous batching over `slots` cache rows of `max_len` tokens, with a waiting queue of `max_queue`."""

    def __init__(self, model: DiffusionGemmaModel, slots: int, max_len: int, max_queue: int):
        if slots < 1 or max_queue < 0:
            raise ConfigError(f"need slots >= 1 and max_queue >= 0, got {slots} and {max_queue}")
        self.model, self.slots, self.max_queue = model, slots, max_queue
        self.c = model.config.canvas_length
        self.cache = KVCache(model.text, slots, max_len, self.c, model.dtype, model.device)
        self._waiting: deque[tuple[Request, Callable[[Event], None], float]] = deque()
        self._active: list[_Row] = []  # row i sits in cache slot i; changed by the engine thread, under the lock
        self._cancelled: set[str] = set()
        self._lock = threading.Condition()  # guards the queue, the cancellations and `_active`; wakes the loop
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = self.rows_stepped = self.batch_size = 0  # counters for metrics

    # -- the caller's side (any thread) ------------------------------------------------------------
    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_requests(self) -> int:
        return len(self._active)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self, request: Request) -> None:
        """Raise `ConfigError` for a request this scheduler cannot run."""
        request.gen.validate()
        n_canvases = math.ceil(request.gen.max_new_tokens / self.c)
        _validate(self.model, [request.prompt], request.gen, n_canvases, request.start, [request.constraint])
        check_media(self.model, [request.prompt], **_media_kwargs(request.media or {}))
        need = len(request.prompt) + (n_canvases - 1) * self.c
        if need > self.max_len:
            raise ConfigError(f"prompt ({len(request.prompt)} tokens) + {n_canvases} canvas(es) of {self.c} tokens "
                              f"needs {need} cached tokens; this server holds at most {self.max_len} per request")

    def submit(self, requests: Sequence[Request], on_event: EventCallback) -> None:
        """Queue requests together (all or none); `on_event(i, event)` is called from the engine thread.

        Raises `ConfigError` for an invalid request and `QueueFull` when they do not fit the queue.
        """
        for r in requests:
            self.check(r)
        if len(requests) > self.slots + self.max_queue:  # could never be queued together: not worth a retry
            raise ConfigError(f"{len(requests)} requests submitted together; this server holds at most "
                              f"{self.slots + self.max_queue} at once ({self.slots} slots and a queue of "
                              f"{self.max_queue})")
        now = time.perf_counter()
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            free = self.slots - len(self._active)
            if len(self._waiting) + len(requests) > self.max_queue + free:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (queue of {self.max_queue}) and "
                                f"{self.slots - free} of {self.slots} slots are busy")
            for i, r in enumerate(requests):
                self._waiting.append((r, lambda event, i=i: on_event(i, event), now))
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request: a waiting one leaves the queue now, a running one frees its slot before the next step."""
        with self._lock:
            for item in self._waiting:
                if item[0].id == request_id:
                    self._waiting.remove(item)
                    break
            else:
                self._cancelled.add(request_id)
                self._lock.notify()
                return
        _deliver(item[1], RequestFailed("cancelled"))

    def stream(self, request: Request) -> Iterator[Event]:
        """One request's events, read from a thread (blocking); leaving early cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit([request], lambda _, event: events.put(event))
        finished = False
        try:
            while not finished:
                event = events.get()
                finished = isinstance(event, (GenerationResult, RequestFailed))
                yield event
        finally:
            if not finished:
                self.cancel(request.id)

    def start(self) -> None:
        """Run the engine loop in a background thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dgemma-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop (after the step under way); requests still waiting or running end with
        `RequestFailed("shutdown")`, and new ones are refused with `ShuttingDown`. Calling it again does nothing."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        self._fail_all("the server is shutting down", reason="shutdown")

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._active or self._cancelled or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, never the loop
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}", waiting=False)

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, run one forward over the active rows, advance each; False when there was nothing to do.
        (The background thread calls this; call it directly only when the thread is not running.)

        Rows are padded to the widest row of the pass, so when a newly admitted prompt is longer than a
        canvas, this pass runs the new rows alone (they sit last) and the canvases wait one step.
        """
        self._drop_cancelled()
        first_new = self._admit()
        if not self._active:
            self.batch_size = 0
            return False
        long_prompt = any(r.pending.shape[1] > self.c for r in self._active[first_new:])
        start = first_new if long_prompt else 0
        rows = self._active[start:]
        decoding = [i for i, r in enumerate(rows) if r.state is not None]
        tokens, valid, self_cond = self._batch(rows)
        # all canvases (the steady state): the pass that reads the cache and writes nothing
        denoise = True if len(decoding) == len(rows) else torch.tensor([r.state is not None for r in rows],
                                                                        device=self.cache.device)
        prefills = [r.prefill_media(self.model) if r.state is None and r.canvas_index == 0 else None for r in rows]
        media = batch_media(prefills, tokens.shape[1], self.cache.device)
        # untraced: a server's passes come in a new shape whenever the number of active rows changes, and every
        # recorded trace keeps memory for the life of the process (`dgemma.model.traced`)
        hidden = self.model.forward(tokens, self.cache.rows(start, len(self._active)), valid, denoise, self_cond,
                                    traced=False, media=media)
        logits = iter(self.model.logits(hidden[decoding, :self.c]).split(1)) if decoding else None
        for row in rows:
            if row.state is None:
                row.start_canvas()
            else:
                row.denoised(next(logits))
        self.steps += 1
        self.rows_stepped += len(rows)
        self.batch_size = len(rows)
        self._release([i for i, r in enumerate(self._active) if r.done])
        return True

    def _batch(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """tokens and valid [n, T] (encoder rows: their pending tokens; decoder rows: their canvas), and the
        decoder rows' self-conditioning soft embeddings [n, T, H] (zero for rows without)."""
        new = [r.pending[0] if r.state is None else r.state.canvas[0] for r in rows]
        width = max(len(t) for t in new)
        device = self.cache.device
        tokens = torch.zeros((len(rows), width), dtype=torch.long, device=device)  # masked filler
        valid = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for i, t in enumerate(new):
            tokens[i, :len(t)] = t
            valid[i, :len(t)] = True
        conditioned = [i for i, r in enumerate(rows) if r.state is not None and r.state.self_cond is not None]
        if not conditioned:
            return tokens, valid, None
        soft = torch.zeros((len(rows), width, self.model.text.hidden_size), dtype=self.model.dtype, device=device)
        for i in conditioned:
            soft[i, :self.c] = self.model.embed_probs(rows[i].state.self_cond)[0]
        return tokens, valid, soft

    def _admit(self) -> int:
        """Move waiting requests into free slots; returns the index of the first one admitted now."""
        with self._lock:
            first = len(self._active)
            while self._waiting and len(self._active) < self.slots:
                request, on_event, submitted = self._waiting.popleft()
                self._active.append(_Row(request, on_event, self.model, submitted))
            return first

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        gone = [i for i, r in enumerate(self._active) if r.request.id in cancelled]
        for i in gone:
            self._active[i].emit(RequestFailed("cancelled"))
        self._release(gone)

    def _release(self, indices: list[int]) -> None:
        """Free the slots of finished rows at once: the last active row moves into each freed slot."""
        with self._lock:
            for i in sorted(indices, reverse=True):
                last = len(self._active) - 1
                if i == last:
                    self.cache.reset_rows(torch.tensor([i], device=self.cache.device))
                else:
                    self.cache.move_row(last, i)
                    self._active[i] = self._active[last]
                self._active.pop()

    def _fail_all(self, message: str, waiting: bool = True, reason: str = "error") -> None:
        """End the running (and, with `waiting`, the queued) requests with an error; empty their slots."""
        with self._lock:
            rows, self._active = self._active, []
            queued = list(self._waiting) if waiting else []
            if waiting:
                self._waiting.clear()
        self.cache.reset_rows(torch.arange(self.slots, device=self.cache.device))
        for row in rows:
            row.emit(RequestFailed(reason, message))
        for _, on_event, _ in queued:
            _deliver(on_event, RequestFailed(reason, message))


class AsyncStreams:
    """Requests submitted together whose events are read from asyncio: `async for i, event in streams.events()`.

    Construct it on the event loop; raises what `Scheduler.submit` raises. Events arrive through
    `loop.call_soon_threadsafe`, so the engine thread never waits for the reader.
    """

    def __init__(self, scheduler: Scheduler, requests: Sequence[Request]):
        self.scheduler, self.requests = scheduler, list(requests)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._open = set(range(len(self.requests)))
        scheduler.submit(self.requests, self._deliver)

    def _deliver(self, index: int, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

    async def events(self, timeout_s: float | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Every request's events until each has ended; `TimeoutError` once `timeout_s` have passed."""
        deadline = None if timeout_s is None else self._loop.time() + timeout_s
        while self._open:
            remaining = None if deadline is None else max(deadline - self._loop.time(), 0.0)
            index, event = await asyncio.wait_for(self._queue.get(), remaining)
            if isinstance(event, (GenerationResult, RequestFailed)):
                self._open.discard(index)
            yield index, event

    def cancel(self, index: int | None = None) -> None:
        """Cancel one request (by index) or all that have not ended; their slots free before the next step."""
        for i in sorted(self._open) if index is None else [index]:
            self.scheduler.cancel(self.requests[i].id)
