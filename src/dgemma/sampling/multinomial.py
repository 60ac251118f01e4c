"""`torch.multinomial(probs, 1)` for some rows only, with the generator left exactly where the full call leaves it.

The canvas sampler draws a token at every canvas position and keeps it only where the entropy bound accepts
the position (a handful per pass); the rest is re-noised. The reference draws all of them, and on the CPU
that draw is a large part of a pass: for one sample per row `torch.multinomial` takes `argmax(p / q)` with
`q` an Exp(1) draw per vocabulary entry, and the exponential kernel is serial — ~25 ms for a 256 x 4096
canvas on a 2-core EPYC, about as much as all of the small model's matmuls.

Here the same picks come out for the rows that are used while the rest of the draw is only skipped: CPU
`exponential_` turns one 53-bit uniform double per element into `-log1p(-u)` (in double, then rounded to
the tensor's dtype), in element order, and `uniform_` on a float64 tensor consumes the generator in exactly
the same way. So the generator is advanced past unused rows into a scratch buffer (with `random_` on int64,
which takes the same 64 bits per element: a fifth of the exponentials' cost), and the used rows get their
uniforms, exponentials and `argmax(p / q)` as `torch.multinomial` computes them: uniforms a span of rows at a
time, exponentials and picks for all used rows in one go (a pass accepts a few scattered positions, and
per-row calls cost more than the arithmetic).

That equivalence is a property of PyTorch's CPU kernels, not a documented contract, so it is checked on
the first call of the process (per dtype) against `torch.multinomial` itself (same shape, same generator state: the
picks of every row and the generator's state afterwards must be equal); if it does not hold, every call
falls back to `torch.multinomial`. CUDA generators always use `torch.multinomial`.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_SCRATCH = 1 << 17  # doubles drawn per skip chunk (1 MiB: a larger fresh buffer costs more in page faults)
_verified: dict[torch.dtype, bool] = {}  # per probability dtype; absent: not checked yet in this process


def multinomial_rows(probs: torch.Tensor, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One categorical draw per row of `probs` [N, V], as `torch.multinomial(probs, 1, generator=...)` [N] would
    draw it, for the rows where `rows` [N] is True; the other rows hold 0. The generator ends where the full
    call would leave it."""
    if not _emulable(probs, generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    gen = torch.default_generator if generator is None else generator
    if probs.dtype not in _verified:
        same, picks = _check(probs, gen)
        if picks is not None:
            _verified[probs.dtype] = same
            return picks.masked_fill(~rows, 0)
    if not _verified.get(probs.dtype, False):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return _draw(probs, rows, gen)


def _emulable(probs: torch.Tensor, generator: torch.Generator | None) -> bool:
    return (probs.device.type == "cpu" and probs.dtype in (torch.float32, torch.float64) and probs.dim() == 2
            and probs.is_contiguous() and (generator is None or generator.device.type == "cpu"))


def _skip(gen: torch.Generator, n: int) -> None:
    """Advance `gen` as `n` exponential (= float64 uniform) draws would."""
    if n <= 0:
        return
    scratch = torch.empty(min(n, _SCRATCH), dtype=_skip_dtype())
    while n > 0:
        k = min(n, scratch.numel())
        if scratch.dtype == torch.int64:
            scratch[:k].random_(generator=gen)
        else:
            scratch[:k].uniform_(generator=gen)
        n -= k


def _skip_dtype() -> torch.dtype:
    """int64 where `random_` on it advances a generator exactly as float64 `uniform_` does (both take 64 random
    bits per element; `random_` ~30% faster as it does no arithmetic on them), else float64; checked once per
    process on two fresh generators, over a few of the Mersenne Twister's 624-word refills."""
    global _SKIP_DTYPE
    if _SKIP_DTYPE is None:
        a, b = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(12345)
        for k in (1, 1000, 2047):
            torch.empty(k, dtype=torch.float64).uniform_(generator=a)
            torch.empty(k, dtype=torch.int64).random_(generator=b)
        _SKIP_DTYPE = torch.int64 if torch.equal(a.get_state(), b.get_state()) else torch.float64
    return _SKIP_DTYPE


_SKIP_DTYPE: torch.dtype | None = None


def _draw(probs: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, v = probs.shape
    out = torch.zeros(n, dtype=torch.long)
    picked = rows.nonzero().flatten()
    if picked.numel() == 0:
        _skip(gen, n * v)
        return out
    p = probs.index_select(0, picked)
    if not _plainly_valid(p) and _invalid(p):
        torch.multinomial(p, 1)  # raises the reference's error for invalid probabilities
    # the used rows' uniforms, drawn a span of rows at a time: the rows between used ones inside a span are
    # drawn too (skipping them would cost as much), spans at most a scratch buffer long, skips between spans
    uniforms, done, order = [], 0, picked.tolist()
    span = max(1, _SCRATCH // v)
    i = 0
    while i < len(order):
        start = order[i]
        j = i
        while j + 1 < len(order) and order[j + 1] < start + span:
            j += 1
        end = order[j] + 1
        _skip(gen, (start - done) * v)
        u = torch.empty(end - start, v, dtype=torch.float64).uniform_(generator=gen)
        uniforms.append(u if j - i + 1 == end - start else u[torch.tensor(order[i:j + 1]) - start])
        done, i = end, j + 1
    _skip(gen, (n - done) * v)
    u = uniforms[0] if len(uniforms) == 1 else torch.cat(uniforms)
    q = torch.log1p(u.neg_()).neg_().to(probs.dtype)
    out[picked] = torch.div(p, q).argmax(dim=-1)
    return out


def _plainly_valid(p: torch.Tensor) -> bool:
    """Cheap sufficient test that rows [N, V] are valid probabilities: every row sum finite and positive (a NaN or
    an infinity makes its row's sum non-finite) and no entry negative. Rows it does not clear (a sum that
    overflows, say) go to `_invalid`."""
    sums = p.sum(-1)
    return bool(torch.isfinite(sums).all()) and bool((sums > 0).all()) and bool(p.amin() >= 0)


def _invalid(p: torch.Tensor) -> bool:
    """Whether `torch.multinomial` rejects rows [N, V]: a non-finite or negative entry, or a row summing to 0."""
    return not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or not bool((p.sum(-1) > 0).all())


def _check(probs: torch.Tensor, gen: torch.Generator) -> tuple[bool, torch.Tensor | None]:
    """Draw once both ways from the same generator state; returns (equal, the reference's picks), or
    (False, None) for probabilities torch.multinomial rejects (checked again on the next call)."""
    try:
        state = gen.get_state()
        ref = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        ref_state = gen.get_state()
        gen.set_state(state)
        mine = _draw(probs, torch.ones(probs.shape[0], dtype=torch.bool), gen)
        same = torch.equal(mine, ref) and torch.equal(gen.get_state(), ref_state)
        gen.set_state(ref_state)
    except RuntimeError:  # invalid probabilities: let torch.multinomial say so, check again on the next call
        return False, None
    if not same:
        log.info("torch.multinomial's CPU draw is not reproduced here; drawing every row with it")
    return same, ref
