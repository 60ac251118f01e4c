"""Block-autoregressive canvas generation: the one decoding loop.

For each canvas: encode what is not cached yet (the prompt, then the last committed canvas, which the eager
path folds into the next canvas's first decoder pass); start from uniform noise (or a caller-given canvas);
denoise for up to N steps — decoder pass, temperature, sample, entropy-bound acceptance, re-noise the rest,
self-condition on the scaled logits, stop early per row when stable and confident; commit the argmax canvas;
stop rows at EOS. `stream_generate` yields every step's draft and every committed canvas; `generate`
collects them.

Rows are independent: a row's cache length, positions and (with per-row generators) random numbers
are its own, so a prompt gives the same tokens alone or in a batch of prompts of other lengths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch

from ..config import ConfigError, GenerationConfig
from ..model.kv_cache import KVCache
from ..model.model import DiffusionGemmaModel
from ..sampling import CanvasRNG
from ..sampling.constraint import CanvasConstraint
from ..sampling.step import CanvasState, denoise_update
from .media import PromptMedia, batch_media
from .static import StaticPool


@dataclass
class DenoiseStep:
    """One denoising pass: the argmax draft and which positions were accepted, per row."""

    canvas_index: int
    step: int  # 1-based pass number within this canvas
    draft: torch.Tensor  # [B, C] argmax canvas
    accepted: torch.Tensor  # [B, C] bool
    active: torch.Tensor  # [B] rows still denoising after this step


@dataclass
class CanvasCommit:
    """A finished canvas appended to every row (pad after a row's EOS)."""

    canvas_index: int
    tokens: torch.Tensor  # [B, C]
    finished: torch.Tensor  # [B] rows that have produced EOS
    passes: torch.Tensor  # [B] decoder passes spent on this canvas


@dataclass
class GenerationStats:
    passes_per_canvas: list[list[int]] = field(default_factory=list)  # per row
    decoder_passes: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)  # non-pad generated tokens per row
    tokens_per_forward: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    first_canvas_s: float = 0.0
    grammar_complete: list[bool | None] = field(default_factory=list)  # per row: its constraint's text ended (None: no
    # constraint); False means the output ran out of tokens before the grammar was satisfied


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per row: canvases, pad after EOS
    stats: GenerationStats


@dataclass
class CanvasSpec:
    """Caller-given starting canvas for the first canvas. `fixed` positions keep their token: never
    re-noised, always committed (infilling, templates)."""

    tokens: torch.Tensor  # [B, C]
    fixed: torch.Tensor | None = None  # [B, C] bool


def context_length_needed(prompt_lengths: Sequence[int], n_canvases: int, canvas_length: int) -> int:
    return max(prompt_lengths) + n_canvases * canvas_length


def check_tokens(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]], eos: Sequence[int] | None,
                 pad: int | None) -> None:
    """Prompts that are not empty, and prompt, EOS and pad ids inside the vocabulary."""
    vocab = model.text.vocab_size
    if not prompts:
        raise ConfigError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty: a prompt needs at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    bad = [t for t in eos or [] if not 0 <= t < vocab]
    if bad:
        raise ConfigError(f"eos_token_id {bad[0]} is outside the vocabulary [0, {vocab})")
    if pad is not None and not 0 <= pad < vocab:
        raise ConfigError(f"pad_token_id {pad} is outside the vocabulary [0, {vocab})")


def _validate(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
              n_canvases: int, start: CanvasSpec | None,
              constraints: Sequence[CanvasConstraint | None] | None = None) -> None:
    gen.validate()
    if constraints is not None:
        if len(constraints) != len(prompts):
            raise ConfigError(f"got {len(constraints)} constraints for {len(prompts)} prompts")
        if start is not None and any(c is not None for c in constraints):
            raise ConfigError("a grammar constraint cannot be combined with a starting canvas (decoder_input_ids)")
    text, c = model.text, model.config.canvas_length
    check_tokens(model, prompts, gen.eos_token_id, gen.pad_token_id)
    need = context_length_needed([len(p) for p in prompts], n_canvases, c)
    if need > text.max_position_embeddings:
        raise ConfigError(f"prompt ({max(len(p) for p in prompts)} tokens) + {n_canvases} canvas(es) of {c} tokens "
                          f"= {need} tokens exceeds the model context of {text.max_position_embeddings}")
    if start is not None:
        want = (len(prompts), c)
        if tuple(start.tokens.shape) != want:
            raise ConfigError(f"starting canvas has shape {list(start.tokens.shape)}, expected {list(want)}")
        if start.fixed is not None and tuple(start.fixed.shape) != want:
            raise ConfigError(f"fixed-position mask has shape {list(start.fixed.shape)}, expected {list(want)}")
        bad = start.tokens[(start.tokens < 0) | (start.tokens >= text.vocab_size)]
        if bad.numel():
            raise ConfigError(f"starting canvas has token ids outside the vocabulary [0, {text.vocab_size}): "
                              f"{bad[:5].tolist()}")


def _right_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    valid = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        valid[i, :len(r)] = True
    return tokens, valid


def count_new_tokens(out: torch.Tensor, pad: int | None) -> list[int]:
    """Generated tokens per row of `out` [B, N]: those that are not pad (all of them when there is no pad id)."""
    return (out != pad).sum(dim=1).tolist() if pad is not None else [out.shape[1]] * out.shape[0]


def _pad_after_eos(tokens: torch.Tensor, eos: torch.Tensor, pad: int | None, fixed: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens after a row's first EOS become pad (stay as they are with no pad id), except `fixed` [B, C]
    positions (given tokens are always committed: an infilling suffix stays when the model ends its text in the
    hole); returns (tokens, row has EOS)."""
    is_eos = torch.isin(tokens, eos)
    if pad is None:
        return tokens, is_eos.any(dim=-1)
    seen = is_eos.cumsum(dim=-1)
    after = (seen > 0) & ~((seen == 1) & is_eos)
    if fixed is not None:
        after &= ~fixed
    return tokens.masked_fill(after, pad), is_eos.any(dim=-1)


@contextmanager
def _returned_to(static: StaticPool | None, cache: KVCache) -> Iterator[None]:
    try:
        yield
    finally:
        if static is not None:
            static.release(cache)


@torch.inference_mode()
def stream_generate(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                    generators: list[torch.Generator | None] | None = None,
                    start: CanvasSpec | None = None, static: StaticPool | None = None,
                    media: Sequence[PromptMedia | None] | None = None,
                    constraints: Sequence[CanvasConstraint | None] | None = None
                    ) -> Iterator[DenoiseStep | CanvasCommit | GenerationResult]:
    """Yields a `DenoiseStep` per decoder pass, a `CanvasCommit` per canvas, and finally a `GenerationResult`.

    `generators=None` draws from torch's global generator in the reference order; a list gives each row
    its own generator (batch-invariant tokens). With `static`, decoder passes run with fixed shapes over a
    reused cache (`engine.static`; a CUDA graph on the GPU) instead of the eager pass. `media`: per prompt its
    images' soft tokens (`engine.media.prompt_media`), put in place when the prompt is encoded. `constraints` [B]
    hold each row's grammar (None: unconstrained); they carry the grammar state from canvas to canvas.
    """
    t0 = time.perf_counter()
    c, vocab, device = model.config.canvas_length, model.text.vocab_size, model.device
    n_canvases = math.ceil(gen.max_new_tokens / c)
    _validate(model, prompts, gen, n_canvases, start, constraints)
    b = len(prompts)
    rng = CanvasRNG(generators)
    eos = torch.tensor(gen.eos_token_id or [], dtype=torch.long, device=device)
    pad = gen.pad_token_id  # None: as in transformers, tokens after a row's EOS stay as generated
    max_len = max(len(p) for p in prompts) + (n_canvases - 1) * c
    if static is not None:
        cache, denoise = static.get(model, b, max_len)
    else:
        cache = KVCache(model.text, b, max_len, c, model.dtype, device)
        denoise = partial(model.denoise, context=cache)
    pending, valid = _right_pad(prompts, 0 if pad is None else pad, device)  # the filler is masked out
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    total_passes = torch.zeros(b, dtype=torch.long, device=device)
    stats = GenerationStats(passes_per_canvas=[[] for _ in range(b)])
    committed: list[torch.Tensor] = []

    # LM head and expected embedding on a transposed copy (CPU, same bits); the static cache back to its pool at
    # the end, however the generation ends (a stream closed early included)
    with model.vocab_session(), _returned_to(static, cache):
        for ci in range(n_canvases):
            # a committed canvas is encoded in the next canvas's first decoder pass (eager path: the same numbers,
            # one pass fewer); the prompt, and every commit on the static path, get a pass of their own
            fused_commit = ci > 0 and static is None and model.commit_fusable(b, pending.shape[1], c)
            if not fused_commit:
                model.encode(pending, cache, valid, batch_media(media, pending.shape[1], device) if ci == 0 and media
                             else None)
            if static is not None:
                denoise.prepare()
            canvas = rng.tokens(b, c, vocab, device)  # drawn even when a canvas is given, as the reference does
            first_given = ci == 0 and start is not None
            if first_given:
                canvas = start.tokens.to(device)
            fixed = start.fixed.to(device) if first_given and start.fixed is not None else None
            state = CanvasState.start(canvas, gen, fixed, model.dtype, constraints)
            passes = torch.zeros(b, dtype=torch.long, device=device)
            soft, frozen = None, None  # the last pass's self-conditioning input; rows whose input is unchanged since
            for step, steps_left in enumerate(range(gen.max_denoising_steps, 0, -1), 1):
                passes += ~(state.done | finished)
                rows = None
                if fused_commit and step == 1:
                    logits = model.commit_and_denoise(pending, state.canvas, cache)
                elif static is not None:  # fixed shapes: every row's logits
                    logits = denoise(state.canvas, self_cond_probs=state.self_cond)
                else:
                    # rows that stopped early ride along in the pass (leaving them out would change how the others'
                    # expert groups round), but their logits, sampling work and self-conditioning input are not
                    # computed again where that is exact
                    rows = _exact_subset(model, state.done, c)
                    soft = _self_conditioning(model, state.self_cond, soft, frozen, c)
                    logits = denoise(state.canvas, self_cond_embeddings=soft, rows=rows)
                frozen = state.done  # rows stopped before this update keep their self-conditioning input
                accepted = denoise_update(state, logits, steps_left, gen, rng, rows)
                yield DenoiseStep(ci, step, state.draft, accepted, ~(state.done | finished))
                if bool(state.done.all()):
                    break

            draft = state.draft
            tokens = draft.clone() if pad is None else draft.masked_fill(finished[:, None], pad)
            tokens, has_eos = _pad_after_eos(tokens, eos, pad, fixed)
            _commit_constraints(constraints, tokens, finished)
            finished |= has_eos
            total_passes += passes
            for r in range(b):
                stats.passes_per_canvas[r].append(int(passes[r]))
            committed.append(tokens)
            if ci == 0:
                stats.first_canvas_s = time.perf_counter() - t0
            yield CanvasCommit(ci, tokens, finished.clone(), passes)
            if bool(finished.all()):
                break
            pending, valid = tokens, torch.ones_like(tokens, dtype=torch.bool)

        out = torch.cat(committed, dim=1)
        stats.new_tokens = count_new_tokens(out, pad)
        stats.decoder_passes = total_passes.tolist()
        stats.tokens_per_forward = [n / max(p, 1) for n, p in zip(stats.new_tokens, stats.decoder_passes)]
        stats.wall_time_s = time.perf_counter() - t0
        stats.grammar_complete = [None if c is None else c.complete for c in constraints or [None] * b]
        yield GenerationResult(out.tolist(), stats)


def _commit_constraints(constraints: Sequence[CanvasConstraint | None] | None, tokens: torch.Tensor,
                        finished: torch.Tensor) -> None:
    """The committed canvas [B, C] becomes each constrained row's grammar state (rows that had finished: none)."""
    for r, constraint in enumerate(constraints or []):
        if constraint is not None and not bool(finished[r]):
            constraint.commit(tokens[r].tolist())


def _exact_subset(model: DiffusionGemmaModel, skip: torch.Tensor, canvas: int) -> torch.Tensor | None:
    """The batch rows not in `skip` [B] (the rows that stopped: their logits are not needed; or whose
    self-conditioning input is unchanged), when some rows are skipped and leaving them out of the vocabulary
    matmuls keeps every bit; else None. CPU only: a GPU's reductions (the entropy's sums) may split their work
    differently over fewer positions."""
    if skip.device.type != "cpu" or not bool(skip.any()):
        return None
    rows = (~skip).nonzero().flatten()
    return rows if model.vocab_rows_exact(rows.numel() * canvas, skip.numel() * canvas) else None


def _self_conditioning(model: DiffusionGemmaModel, probs: torch.Tensor | None, before: torch.Tensor | None,
                       frozen: torch.Tensor | None, canvas: int) -> torch.Tensor | None:
    """The pass's self-conditioning input `embed_probs(probs)`, [B, C, H]: rows in `frozen` have the same `probs`
    as when `before` was computed, so on the CPU only the other rows' are computed again (in place in `before`)
    where a subset's product rounds them as the whole batch's does."""
    if probs is None:
        return None
    fresh = None if before is None else _exact_subset(model, frozen, canvas)
    if fresh is None:
        return model.embed_probs(probs)
    return before.index_copy_(0, fresh, model.embed_probs(probs.index_select(0, fresh)))


def generate(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
             generators: list[torch.Generator | None] | None = None,
             start: CanvasSpec | None = None, static: StaticPool | None = None,
             media: Sequence[PromptMedia | None] | None = None,
             constraints: Sequence[CanvasConstraint | None] | None = None) -> GenerationResult:
    result = None
    for event in stream_generate(model, prompts, gen, generators, start, static, media, constraints):
        result = event
    return result
