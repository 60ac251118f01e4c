"""A grammar constraint on the canvas: the committed text is always a valid prefix of the language, and an
end-of-sequence token comes only where the text is complete.

What is constrained, each denoising pass of a constrained row:
- the argmax draft (the canvas that gets committed) becomes a valid continuation of the text committed so far:
  `masked argmax` (the default) walks it left to right and, where the model's argmax is not allowed, takes the
  most probable allowed token; `dp` searches for the most probable valid canvas (DINGO, arXiv 2505.23061: a dynamic
  program over positions and grammar states) over each position's top candidates plus the best allowed token;
- the tokens acceptance takes (sampled tokens written into the canvas) must continue the draft's valid prefix at
  their position; one that does not is replaced by the draft's token there.
What is not: the model's own distributions (the entropy that drives acceptance and early stopping, and the
self-conditioning input) stay as the model gave them (benchmarks/structured_overhead.py measures the choice).

The grammar state carries over from canvas to canvas: the matcher holds the committed text, plus this canvas's
draft on top, which the next pass rolls back only as far as the draft changed (most of a draft is stable from
pass to pass, so most passes check a few tokens, not a whole canvas). Stop tokens are never fed to the matcher:
one is allowed where the matcher is in an accepting state.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

POLICIES = ("argmax", "dp")

log = logging.getLogger(__name__)


class CanvasConstraint:
    """One row's grammar state across its canvases (wraps an llguidance matcher from `GrammarCompiler`)."""

    def __init__(self, matcher, stop_ids: Sequence[int], n_vocab: int, pad_id: int | None = None,
                 policy: str = "argmax", beam: int = 4, candidates: int = 4):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.matcher, self.n_vocab, self.pad_id, self.policy = matcher, n_vocab, pad_id, policy
        self.stop_ids = frozenset(stop_ids)
        self.beam, self.candidates = beam, candidates
        self._draft: list[int] = []  # tokens the matcher holds past the committed text (the last draft, to its end)
        self._masks: list[np.ndarray | None] = []  # the token mask at each draft position, where it was computed
        self._ended = False  # the last draft ends with a stop token (after `_draft`)
        self._dead = False  # the grammar allows nothing after `_draft`: the row is filled and ends incomplete
        self._fill = pad_id if pad_id is not None else min(stop_ids)
        self.complete = False  # the committed text has ended with a stop token
        self.work_s = 0.0  # time spent in this object (benchmarks)
        self.masks_computed = 0

    # -- per pass ----------------------------------------------------------------------------------
    def constrain(self, probs: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
        """The constrained draft [C] for this pass, given the pass's probabilities [C, V] and argmax [C]."""
        t0 = time.perf_counter()
        am = argmax.tolist()
        if self.complete:  # the text ended in an earlier canvas: nothing more to write (the row has finished)
            out = am
        elif self._dead:
            out = self._draft + [self._fill] * (len(am) - len(self._draft))
        elif self.policy == "argmax":
            out = self._walk(probs, am)
        else:
            out = self._search(probs, am)
        self.work_s += time.perf_counter() - t0
        return torch.tensor(out, dtype=argmax.dtype, device=argmax.device)

    def accept(self, draft: torch.Tensor, sampled: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
        """`sampled` [C] with each accepted position that does not continue the draft's valid prefix there replaced
        by the draft's token."""
        if self.complete:
            return sampled
        if self._dead:  # no sample can continue the text: the draft (its prefix, then fill) stands
            return torch.where(accepted, draft, sampled)
        t0 = time.perf_counter()
        end = len(self._draft)
        check = [i for i in (accepted & (sampled != draft)).nonzero().flatten().tolist() if i <= end]
        if not check:
            return sampled
        out, d = sampled.clone(), self._draft
        m = self.matcher
        m.rollback(end - check[0])
        todo = set(check)
        for j in range(check[0], end + 1):
            if j in todo:
                s = int(sampled[j])
                ok = m.is_accepting() if s in self.stop_ids else m.try_consume_tokens([s]) == 1
                if ok and s not in self.stop_ids:
                    m.rollback(1)
                if not ok:
                    out[j] = draft[j]
            if j < end:
                m.consume_token(d[j])
        self.work_s += time.perf_counter() - t0
        return out

    def commit(self, tokens: Sequence[int]) -> None:
        """The canvas was committed (`tokens`, the last draft with pad after a stop): it becomes the base state."""
        tokens = list(tokens)
        n = len(self._draft)
        if tokens[:n] != self._draft or (self._ended and (n >= len(tokens) or tokens[n] not in self.stop_ids)):
            self._resync(tokens)  # not expected: the committed canvas is the last draft
        if self._ended:
            self.complete = True
        self._draft, self._masks, self._ended = [], [], False

    # -- masked argmax -----------------------------------------------------------------------------
    def _walk(self, probs: torch.Tensor, am: list[int]) -> list[int]:
        old, masks, c = self._draft, self._masks, len(am)
        i, choice = 0, None
        while i < len(old):  # the part of the last draft this pass keeps
            if am[i] != old[i]:
                choice = self._pick(probs[i], am[i], masks[i]) if masks[i] is not None else None
                if choice != old[i]:
                    break
            i += 1
        if i == len(old) and self._ended and i < c:  # the last draft ended here: does it still?
            choice = am[i] if am[i] in self.stop_ids else None
            if choice is not None:
                return old + am[i:]
        self.matcher.rollback(len(old) - i)
        del old[i:]
        del masks[i + 1:]
        self._ended = False
        for j in range(i, c):
            a = am[j]
            mask = masks[j] if j < len(masks) else None
            if j == i and choice is not None:
                t = choice
            elif a in self.stop_ids:
                t = a if self.matcher.is_accepting() else None
            elif mask is None and self.matcher.try_consume_tokens([a]) == 1:
                old.append(a)
                masks.append(None)
                continue
            else:
                t = None
            if t is None:
                mask = mask if mask is not None else self._mask()
                t = self._pick(probs[j], a, mask)
                if t is None:
                    return self._dead_end(c)
            if t in self.stop_ids:
                self._ended = True
                del masks[j:]
                return old + [t] + am[j + 1:]
            if not self.matcher.consume_token(t):  # the engine gave up (a grammar too complex to go on with)
                log.warning("the grammar engine stopped: %s", self.matcher.get_error().splitlines()[0])
                del self._masks[len(old):]
                return self._dead_end(c)
            old.append(t)
            if j < len(masks):
                masks[j] = mask
            else:
                masks.append(mask)
        return list(old)

    def _dead_end(self, c: int) -> list[int]:
        """The grammar allows no token after the draft so far (a dead end of the grammar, never of a JSON schema):
        the rest of the row is fill, and its text stays an incomplete prefix."""
        self._dead, self._ended = True, False
        del self._masks[len(self._draft):]
        return self._draft + [self._fill] * (c - len(self._draft))

    def _mask(self, matcher=None) -> np.ndarray:
        """The allowed-token bitmask at the matcher's state (this row's, or a search state's). Stop tokens only where
        the grammar accepts: at a dead end the engine allows the end-of-sequence token (and flags an error)."""
        matcher = matcher or self.matcher
        mask = np.empty((self.n_vocab + 31) // 32, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        self.masks_computed += 1
        if not matcher.is_accepting():
            bits = mask.view(np.uint32)
            for t in self.stop_ids:
                bits[t >> 5] &= np.uint32(0xFFFFFFFF ^ (1 << (t & 31)))
        return mask

    def _pick(self, probs: torch.Tensor, token: int, mask: np.ndarray) -> int | None:
        """`token` if the mask allows it, else the most probable allowed token."""
        if (int(mask[token >> 5]) >> (token & 31)) & 1:
            return token
        return _best_allowed(probs, mask, self.n_vocab)

    # -- dynamic program (DINGO) -------------------------------------------------------------------
    def _search(self, probs: torch.Tensor, am: list[int]) -> list[int]:
        """The most probable valid canvas under the pass's per-position distributions, searched over each position's
        top `candidates` tokens plus the best allowed token per grammar state. llguidance does not expose its
        automaton states, so a state is a matcher copy and the program keeps the `beam` best per position (exact
        when no more states are reachable)."""
        c = len(am)
        logp = probs.clamp_min(1e-30).log()
        top = logp.topk(min(self.candidates, logp.shape[-1]), dim=-1).indices.tolist()
        end_ids = [self.pad_id] if self.pad_id is not None else sorted(self.stop_ids)
        after = logp[:, end_ids].amax(-1)  # what a position after the end scores (it is committed as pad)
        tail = torch.cat([after.flip(0).cumsum(0).flip(0), after.new_zeros(1)]).tolist()
        stops = sorted(self.stop_ids)
        self.matcher.rollback(len(self._draft))
        beams = [(0.0, [], self.matcher.deep_copy())]
        best_end: tuple[float, list[int]] | None = None
        for i in range(c):
            row = logp[i]
            grown: list[tuple[float, list[int], object, int]] = []
            for score, tokens, m in beams:
                mask = self._mask(m)
                if m.is_accepting():
                    s = max(stops, key=lambda t: float(row[t]))
                    total = score + float(row[s]) + tail[i + 1]
                    if best_end is None or total > best_end[0]:
                        best_end = (total, tokens + [s])
                options = {t for t in top[i] if t not in self.stop_ids and (int(mask[t >> 5]) >> (t & 31)) & 1}
                best = _best_allowed(probs[i], mask, self.n_vocab, exclude=self.stop_ids)
                if best is not None:
                    options.add(best)
                grown.extend((score + float(row[t]), tokens + [t], m, t) for t in options)
            kept = []
            for score, tokens, parent, t in sorted(grown, key=lambda g: -g[0])[:self.beam]:
                child = parent.deep_copy()
                if child.consume_token(t):  # else the engine gave up on this state
                    kept.append((score, tokens, child))
            if not kept:  # every state is at a dead end of the grammar
                break
            beams = kept
        best_open = max(beams, key=lambda b: b[0])
        dead = len(best_open[1]) < c
        if best_end is not None and (dead or best_end[0] >= best_open[0]):
            tokens, ended = best_end[1][:-1], True
            out = best_end[1] + am[len(best_end[1]):]
        else:
            tokens, ended, out = best_open[1], False, best_open[1]
        if not self.matcher.consume_tokens(tokens):  # not expected: each state consumed them before
            raise RuntimeError(f"grammar engine refused the searched canvas: {self.matcher.get_error()}")
        self._draft, self._masks, self._ended = list(tokens), [None] * len(tokens), ended
        return self._dead_end(c) if dead and not ended else out

    def _resync(self, tokens: list[int]) -> None:
        self.matcher.rollback(len(self._draft))
        kept = []
        for t in tokens:
            if t in self.stop_ids:
                self._ended = True
                break
            kept.append(t)
        else:
            self._ended = False
        if not self.matcher.consume_tokens(kept):
            raise RuntimeError(f"committed canvas does not match its grammar: {self.matcher.get_error()}")
        self._draft = kept


def _best_allowed(probs: torch.Tensor, mask: np.ndarray, n_vocab: int, exclude: frozenset[int] = frozenset()
                  ) -> int | None:
    """The most probable token the mask allows (None when it allows none, `exclude` left out)."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:n_vocab]
    allowed = torch.from_numpy(bits).to(torch.bool)
    for t in exclude:
        if t < n_vocab:
            allowed[t] = False
    if not bool(allowed.any()):
        return None
    scores = probs[:n_vocab].masked_fill(~allowed.to(probs.device), -math.inf)
    return int(scores.argmax())


def constrain_drafts(constraints: Sequence[CanvasConstraint | None], probs: torch.Tensor, draft: torch.Tensor,
                     skip: torch.Tensor) -> torch.Tensor:
    """`draft` [B, C] with each constrained row (not in `skip` [B]) replaced by its constrained draft."""
    out = draft
    for b, constraint in enumerate(constraints):
        if constraint is not None and not bool(skip[b]):
            out = out.clone() if out is draft else out
            out[b] = constraint.constrain(probs[b], draft[b])
    return out


def constrain_samples(constraints: Sequence[CanvasConstraint | None], draft: torch.Tensor, sampled: torch.Tensor,
                      accepted: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """`sampled` [B, C] with each constrained row's accepted tokens kept to its grammar (`CanvasConstraint.accept`)."""
    out = sampled
    for b, constraint in enumerate(constraints):
        if constraint is not None and not bool(skip[b]):
            out = out.clone() if out is sampled else out
            out[b] = constraint.accept(draft[b], sampled[b], accepted[b])
    return out


def row_constraints(compiler, constraint, batch: int, pad_id: int | None, policy: str = "argmax"
                    ) -> list[CanvasConstraint | None] | None:
    """Fresh per-row constraints from `constraint`: one `Constraint` for every row, or a list of them (None: that row
    is unconstrained). `compiler` is a `GrammarCompiler`; raises `ConstraintError` for a bad constraint."""
    from .grammar import Constraint, ConstraintError

    if constraint is None:
        return None
    if policy not in POLICIES:
        raise ConstraintError(f"constraint_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    rows = list(constraint) if isinstance(constraint, (list, tuple)) else [constraint] * batch
    if len(rows) != batch:
        raise ConstraintError(f"got {len(rows)} constraints for a batch of {batch}")
    for c in rows:
        if c is not None and not isinstance(c, Constraint):
            raise ConstraintError(f"constraint must be a dgemma Constraint (or a list of them, None for an unconstrained "
                                  f"row), got {type(c).__name__}")
    return [None if c is None else CanvasConstraint(compiler.matcher(c), compiler.stop_ids, compiler.n_vocab, pad_id,
                                                    policy) for c in rows]
