"""A grammar constraint on the canvas: the committed text is always a valid prefix of the language, and an
end-of-sequence token comes only where the text is complete.

What is constrained, each denoising pass of a constrained row:
- the argmax draft (the canvas that gets committed) becomes a valid continuation of the text committed so far:
  `masked argmax` (the default) walks it left to right and, where the model's argmax is not allowed, takes the
  most probable allowed token; `dp` searches for the most probable valid canvas (DINGO, arXiv 2505.23061: a dynamic
  program over positions and grammar states) over each position's top candidates plus the best allowed token;
- the tokens acceptance takes (sampled tokens written into the canvas) must continue the draft's valid prefix at
  their position; one that does not is replaced by the draft's token there.
What is not, by default: the model's own distributions (the entropy that drives acceptance and early stopping, and
the self-conditioning input) stay as the model gave them; `distributions="masked"` renormalises them over what the
grammar allows along the draft instead (benchmarks/structured_overhead.py measures both).

Cost: a token check is microseconds, a token mask about a millisecond at Gemma 4's vocabulary. Masks are computed
only where the model's argmax is not allowed, kept per draft position and reused while the draft before them is
unchanged, and a pass that does not commit computes at most `MASK_WORK_PER_PASS` worth of them: past that, its draft
is the valid prefix walked so far, then the model's argmax (a noisy draft changes before it is committed anyway, and
the samples accepted there are the model's input, never output). The pass that commits (the last one, or the one
where the canvas stops) walks the whole draft.

The grammar state carries over from canvas to canvas: the matcher holds the committed text, plus this canvas's
draft on top, which the next pass rolls back only as far as the draft changed. Stop tokens are never fed to the
matcher: one is allowed where the matcher is in an accepting state. A dead end of the grammar (no token allowed, or
the engine giving up) fills the rest of the row, which ends incomplete.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

POLICIES = ("argmax", "dp")
DISTRIBUTIONS = ("model", "masked")  # what entropy and self-conditioning see (the benchmark measures both)
# Vocabulary-wide work a pass may do, in vocabulary entries (8 at Gemma 4's 262,144; 512 at 4,096), each token
# mask and each search of a mask for the most probable allowed token counting one: either costs about 0.5-1 ms at
# 262,144 on a CPU core, and a pass's constraint work is meant to stay near 10 ms. The last pass of a canvas has no
# budget: the draft it commits is always walked to its end.
MASK_WORK_PER_PASS = 8 * 262_144

log = logging.getLogger(__name__)


class CanvasConstraint:
    """One row's grammar state across its canvases (wraps an llguidance matcher from `GrammarCompiler`)."""

    def __init__(self, matcher, stop_ids: Sequence[int], n_vocab: int, pad_id: int | None = None,
                 policy: str = "argmax", beam: int = 4, candidates: int = 4, distributions: str = "model"):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if distributions not in DISTRIBUTIONS:
            raise ValueError(f"distributions must be one of {DISTRIBUTIONS}, got {distributions!r}")
        self.matcher, self.n_vocab, self.pad_id, self.policy = matcher, n_vocab, pad_id, policy
        self.distributions = distributions
        self.pass_masks = max(1, MASK_WORK_PER_PASS // n_vocab)
        self.stop_ids = frozenset(stop_ids)
        self.beam, self.candidates = beam, candidates
        self._draft: list[int] = []  # tokens the matcher holds past the committed text (the last draft, to its end)
        self._masks: list[np.ndarray | None] = []  # the token mask at each draft position, where it was computed
        self._ended = False  # the last draft ends with a stop token (after `_draft`)
        self._dead = False  # the grammar allows nothing after `_draft`: the row is filled and ends incomplete
        self.cut = False  # the last draft was walked only so far (`_draft`), the pass's work budget spent
        self._masks_left: int | None = None
        self._fill = pad_id if pad_id is not None else min(stop_ids)
        self.complete = False  # the committed text has ended with a stop token
        self.work_s = 0.0  # time spent in this object (benchmarks)
        self.masks_computed = 0
        self._draft_logp = 0.0  # log-probability of the last draft's text (through its stop) under its pass
        self.committed_logp, self.committed_tokens = 0.0, 0  # the same, summed over the committed canvases

    # -- per pass ----------------------------------------------------------------------------------
    def constrain(self, probs: torch.Tensor, argmax: torch.Tensor, final: bool = True) -> torch.Tensor:
        """The constrained draft [C] for this pass, given the pass's probabilities [C, V] and argmax [C].

        Not `final` (a pass that does not commit), the walk stops where it would need more vocabulary-wide work
        (token masks and searches of them) than `pass_masks`: the draft is a valid prefix, then the model's argmax
        (`cut`); a noisy draft changes anyway before it is committed. A `final` pass walks the whole draft; so does calling this again with the cut
        draft as `argmax` once the canvas turns out to be done (`finish_drafts`)."""
        t0 = time.perf_counter()
        am = argmax.tolist()
        self.cut, self._masks_left = False, None if final else self.pass_masks
        if self.complete:  # the text ended in an earlier canvas: nothing more to write (the row has finished)
            out = am
        elif self._dead:
            out = self._draft + [self._fill] * (len(am) - len(self._draft))
        elif self.policy == "argmax":
            out = self._walk(probs, am)
        else:
            out = self._search(probs, am)
        result = torch.tensor(out, dtype=argmax.dtype, device=argmax.device)
        n = min(len(self._draft) + self._ended, len(out))
        self._draft_logp = float(probs[torch.arange(n, device=probs.device), result[:n]].clamp_min(1e-30).log().sum())
        self.work_s += time.perf_counter() - t0
        return result

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
        if not self._dead:
            self.committed_logp += self._draft_logp
            self.committed_tokens += len(self._draft) + self._ended
        self._draft, self._masks, self._ended = [], [], False

    # -- masked argmax -----------------------------------------------------------------------------
    def _walk(self, probs: torch.Tensor, am: list[int]) -> list[int]:
        old, masks, c = self._draft, self._masks, len(am)
        i, choice = 0, None
        while i < len(old):  # the part of the last draft this pass keeps
            if am[i] != old[i]:
                if masks[i] is not None and self._masks_left == 0:  # the budget is spent: cut the draft here
                    return self._cut_at(i, am)
                choice = self._pick(probs[i], am[i], masks[i]) if masks[i] is not None else None
                if choice != old[i]:
                    break  # `choice`: the token at i (None: walk it afresh)
            i += 1
        else:
            choice = None
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
                masks[j:] = [None]  # one entry per draft token (a kept mask at i is replaced)
                continue
            else:
                t = None
            if t is None:
                if self._masks_left is not None and self._masks_left < (1 if mask is not None else 2):
                    return self._cut_at(j, am)  # the pass's budget is spent: the rest stays the model's
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
            masks[j:] = [mask]
        return list(old)

    def _cut_at(self, i: int, am: list[int]) -> list[int]:
        """The draft for a pass whose budget ran out at position i: the valid prefix, then the model's argmax."""
        self.matcher.rollback(len(self._draft) - i)
        del self._draft[i:], self._masks[i:]
        self.cut, self._ended = True, False
        return self._draft + am[i:]

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
        if self._masks_left:
            self._masks_left -= 1
        if not matcher.is_accepting():
            bits = mask.view(np.uint32)
            for t in self.stop_ids:
                bits[t >> 5] &= np.uint32(0xFFFFFFFF ^ (1 << (t & 31)))
        return mask

    def position_masks(self, c: int) -> torch.Tensor:
        """[n, V] bool: what the grammar allows at each of the draft's first n positions (its text, then the
        position after it; after a stop token, every position: only the fill that is committed there), for masking
        the distributions the model's entropy and self-conditioning come from."""
        t0 = time.perf_counter()
        n = len(self._draft)
        self.matcher.rollback(n)
        rows = []
        for i in range(min(n + 1, c)):
            mask = self._masks[i] if i < len(self._masks) and self._masks[i] is not None else self._mask()
            rows.append(np.unpackbits(mask.view(np.uint8), bitorder="little")[:self.n_vocab])
            if i < n:
                self.matcher.consume_token(self._draft[i])
        if self._ended and len(rows) < c:
            fill = np.zeros(self.n_vocab, dtype=np.uint8)
            fill[self._fill] = 1
            rows.extend([fill] * (c - len(rows)))
        self.work_s += time.perf_counter() - t0
        return torch.from_numpy(np.stack(rows)).to(torch.bool)

    def _pick(self, probs: torch.Tensor, token: int, mask: np.ndarray) -> int | None:
        """`token` if the mask allows it, else the most probable allowed token (one unit of the pass's budget)."""
        if (int(mask[token >> 5]) >> (token & 31)) & 1:
            return token
        if self._masks_left:
            self._masks_left -= 1
        return _best_allowed(probs, mask, self.n_vocab)

    # -- dynamic program (DINGO) -------------------------------------------------------------------
    def _search(self, probs: torch.Tensor, am: list[int]) -> list[int]:
        """The most probable valid canvas under the pass's per-position distributions, searched over each position's
        top `candidates` tokens plus the best allowed token per grammar state. llguidance does not expose its
        automaton states, so a state is a matcher copy and the program keeps the `beam` best per position (exact
        when no more states are reachable)."""
        c = len(am)
        k = min(self.candidates, probs.shape[-1])
        stops = sorted(self.stop_ids)
        end_ids = [self.pad_id] if self.pad_id is not None else stops
        # log-probabilities only where the program reads them (a whole-canvas log would cost a pass over C x V)
        logp = probs[:, sorted({*end_ids, *stops})].clamp_min(1e-30).log()
        column = {t: k for k, t in enumerate(sorted({*end_ids, *stops}))}
        after = logp[:, [column[t] for t in end_ids]].amax(-1)  # a position after the end scores as pad
        tail = torch.cat([after.flip(0).cumsum(0).flip(0), after.new_zeros(1)]).tolist()
        self.matcher.rollback(len(self._draft))
        beams = [(0.0, [], self.matcher.deep_copy())]
        best_end: tuple[float, list[int]] | None = None
        for i in range(c):
            if self._masks_left is not None and self._masks_left < 2 * len(beams):  # the pass's budget is spent
                self.cut = True
                break
            row = probs[i]
            top = row.topk(k).indices.tolist()  # per position, as the search reaches it (a canvas-wide top-k is a
            # pass over C x V)
            grown: list[tuple[float, list[int], object, int]] = []
            for score, tokens, m in beams:
                mask = self._mask(m)
                if m.is_accepting():
                    s = max(stops, key=lambda t: float(logp[i, column[t]]))
                    total = score + float(logp[i, column[s]]) + tail[i + 1]
                    if best_end is None or total > best_end[0]:
                        best_end = (total, tokens + [s])
                options = {t for t in top if t not in self.stop_ids and (int(mask[t >> 5]) >> (t & 31)) & 1}
                best = _best_allowed(probs[i], mask, self.n_vocab, exclude=self.stop_ids)
                if self._masks_left:
                    self._masks_left -= 1
                if best is not None:
                    options.add(best)
                grown.extend((score + math.log(max(float(row[t]), 1e-30)), tokens + [t], m, t) for t in options)
            kept = []
            for score, tokens, parent, t in sorted(grown, key=lambda g: -g[0])[:self.beam]:
                child = parent.deep_copy()
                if child.consume_token(t):  # else the engine gave up on this state
                    kept.append((score, tokens, child))
            if not kept:  # every state is at a dead end of the grammar
                break
            beams = kept
        best_open = max(beams, key=lambda b: b[0])
        dead = len(best_open[1]) < c and not self.cut
        if self.cut:  # a valid prefix, then the model's argmax (as the masked argmax's cut)
            tokens, ended, out = best_open[1], False, best_open[1] + am[len(best_open[1]):]
        elif best_end is not None and (dead or best_end[0] >= best_open[0]):
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
    """The most probable token the mask allows (None when it allows none, `exclude` left out). A mask with few
    allowed tokens (a JSON structure's next character, a number's digits) is read as a list of ids; a wide one
    (inside a string) as a vector over the vocabulary."""
    words = np.flatnonzero(mask)
    if len(words) <= _FEW_WORDS:
        bits = np.unpackbits(mask[words].view(np.uint8), bitorder="little").reshape(len(words), 32)
        ids = (words[:, None] * 32 + np.arange(32))[bits.astype(bool)]
        ids = [int(t) for t in ids if t < n_vocab and t not in exclude]
        if not ids:
            return None
        index = torch.tensor(ids, device=probs.device)
        return ids[int(probs[index].argmax())]
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:n_vocab]
    for t in exclude:
        if t < n_vocab:
            bits[t] = 0
    allowed = torch.from_numpy(bits).to(device=probs.device, dtype=probs.dtype)
    best = int((probs[:n_vocab] * allowed).argmax())  # probabilities are >= 0: an allowed token wins, or ties
    return best if bits[best] else int(np.flatnonzero(bits)[0])  # (every allowed one underflowed to 0)


_FEW_WORDS = 64  # masks with at most this many non-zero 32-bit words (2,048 token ids) are read as id lists


def constrain_drafts(constraints: Sequence[CanvasConstraint | None], probs: torch.Tensor, draft: torch.Tensor,
                     skip: torch.Tensor, final: bool = True) -> torch.Tensor:
    """`draft` [B, C] with each constrained row (not in `skip` [B]) replaced by its constrained draft (`final`: the
    canvas is committed after this pass)."""
    out = draft
    for b, constraint in enumerate(constraints):
        if constraint is not None and not bool(skip[b]):
            out = out.clone() if out is draft else out
            out[b] = constraint.constrain(probs[b], draft[b], final)
    return out


def mask_distributions(constraints: Sequence[CanvasConstraint | None], probs: torch.Tensor, entropy: torch.Tensor,
                       cond: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy [B, C], self-conditioning input [B, C, V]) with the rows whose constraint masks distributions
    (`distributions="masked"`) taken from `probs` renormalised over what the grammar allows along the draft; the
    other rows, and `probs` itself (what drafts and samples come from), stay the model's."""
    copied = False
    for b, constraint in enumerate(constraints):
        if constraint is None or constraint.distributions != "masked" or bool(skip[b]) or constraint.complete \
                or constraint._dead:
            continue
        allowed = constraint.position_masks(probs.shape[1]).to(probs.device)
        n = allowed.shape[0]
        p = probs[b, :n].masked_fill(~allowed[:, :probs.shape[-1]], 0.0)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        if not copied:
            entropy, cond, copied = entropy.clone(), cond.clone(), True
        cond[b, :n] = p.to(cond.dtype)
        entropy[b, :n] = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return entropy, cond


def finish_drafts(constraints: Sequence[CanvasConstraint | None], probs: torch.Tensor, draft: torch.Tensor,
                  ending: torch.Tensor) -> torch.Tensor:
    """`draft` [B, C] with the rows in `ending` [B] (their canvas is committed after this pass) whose walk was cut
    walked to the end."""
    out = draft
    for b, constraint in enumerate(constraints):
        if constraint is not None and constraint.cut and bool(ending[b]):
            out = out.clone() if out is draft else out
            out[b] = constraint.constrain(probs[b], draft[b], final=True)
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


def row_constraints(compiler, constraint, batch: int, pad_id: int | None, policy: str = "argmax",
                    distributions: str = "model") -> list[CanvasConstraint | None] | None:
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
                                                    policy, distributions=distributions) for c in rows]
