"""The DiffusionGemma training loss (design doc section 4, the hackable_diffusion recipe).

Per row, the encoder reads the whole clean sequence; its logits get an autoregressive cross-entropy over the
target tokens. One canvas-aligned block of the target is corrupted with uniform-state noise under a linear
schedule (each token kept with probability alpha(t) = 1 - t, else replaced by a uniform random id) and the decoder
predicts the clean block from the encoder keys/values before it. Canvas positions past the end of the sequence
target pad, so the model learns to finish a canvas after EOS as generation does. Self-conditioning is trained in
two passes: a first decoder pass without gradient whose logits feed the second pass for a random half of rows.

Infilling (`infill_prob`): a row's canvas can instead be laid out as inference lays out an infill
(`dgemma.evaluate.infill`, `dgemma.serve.infill`): `[hole of H places][suffix, fixed]`. The hole holds a span
of m target tokens then H - m filler tokens (`<|fill|>`), the suffix continues the sequence after the span.
The suffix is never noised and not in the loss; the hole is noised and in the loss, fillers included. See
`infill_layout` for how H and m are drawn.

With `diffusion_weight == 0` (an AR-only baseline) the decoder does not run at all.

The random choices of a global batch are drawn up front (`plan_canvases`) and the losses are sums divided by
global token counts (`LossTotals`), so the loss is the same however the rows are split across processes or
micro-batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.model import DiffusionGemmaModel
from .batches import Batch

WEIGHTINGS = ("unweighted", "inv_t", "elbo")
SUM_KEYS = ("diffusion_sum", "ar_sum", "canvas_tokens", "ar_tokens")  # what `diffusion_gemma_loss` reports


@dataclass
class CanvasPlan:
    """The corrupted canvas of each row and what the decoder should produce there."""

    start: torch.Tensor  # [B] position of the canvas's first token
    t: torch.Tensor  # [B] noise level
    canvas: torch.Tensor  # [B, C] decoder input
    target: torch.Tensor  # [B, C] clean tokens (pad past the sequence end; fillers in an infill hole)
    valid: torch.Tensor  # [B, C] bool: positions that count in the loss
    self_cond: torch.Tensor  # [B] bool: rows whose second pass sees the first pass's logits
    fixed: torch.Tensor  # [B, C] bool: clean, never-noised positions (an infill's suffix); never in the loss

    def rows(self, index: torch.Tensor) -> "CanvasPlan":
        return CanvasPlan(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def to(self, device: torch.device) -> "CanvasPlan":
        return CanvasPlan(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


@dataclass
class LossTotals:
    """Token counts of the whole global batch: the denominators of both losses."""

    canvas_tokens: int
    ar_tokens: int

    @classmethod
    def of(cls, batch: Batch, plan: CanvasPlan) -> "LossTotals":
        return cls(max(int(plan.valid.sum()), 1), max(int(batch.loss_mask[:, 1:].sum()), 1))


def canvas_starts(loss_mask: torch.Tensor, canvas_length: int, generator: torch.Generator,
                  ends: torch.Tensor | None = None) -> torch.Tensor:
    """One start per row, uniform over the canvas-aligned blocks of its target: target positions whose distance
    from the start of their run of target tokens is a multiple of `canvas_length` (where generation would begin
    a canvas after the prompt). A run also starts after an example's end (`ends` [B, L]: packed examples)."""
    if not bool(loss_mask.any(dim=1).all()):
        raise ValueError("every row needs at least one target token")
    pos = torch.arange(loss_mask.shape[1])
    run_start = loss_mask & ~F.pad(loss_mask, (1, 0))[:, :-1]
    if ends is not None:
        run_start |= loss_mask & F.pad(ends, (1, 0))[:, :-1]
    offset = pos - torch.where(run_start, pos, 0).cummax(dim=1).values
    anchors = loss_mask & (offset % canvas_length == 0)
    return torch.multinomial(anchors.float(), 1, generator=generator).squeeze(1)


def _target_run_left(loss_mask: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L]: how many target tokens of the same example follow without a break from each position on (0 off
    the target); `ends` [B, L] marks the examples' last tokens."""
    b, width = loss_mask.shape
    pos = torch.arange(width).expand(b, width)
    stop = torch.where(loss_mask, width, pos)
    if ends is not None:
        stop = torch.minimum(stop, torch.where(ends, pos + 1, width))
    next_off = stop.flip(1).cummin(dim=1).values.flip(1)
    return next_off - pos


def infill_layout(batch: Batch, start: torch.Tensor, canvas_length: int, infill_prob: float,
                  newline_ids: torch.Tensor | None, generator: torch.Generator,
                  line_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start, hole H, span m), each [B]: which rows are infills and how they are laid out. Rows that are not
    infills get H = m = C (a plain canvas). Always the same four draws from `generator`, whatever the rows.

    Each row is an infill with probability `infill_prob` (never when C == 1). Its hole capacity H is uniform in
    [1, C - 1]. With probability `line_prob`, when `newline_ids` are given, the span is made of whole lines: the
    start moves forward, within the canvas block, to the first line start (just after a token in `newline_ids`,
    the tokens whose text begins with a line break), and the span ends right before a line break chosen
    uniformly among those within reach (m <= H and m <= the target tokens left), so the suffix begins with the
    line break: the layout of `dgemma.evaluate.tasks` (hidden line without its newline, suffix from it on).
    Otherwise (or with no line break within reach) m is uniform in [1, min(H, target tokens left from start)].
    """
    b, width = batch.tokens.shape
    c = canvas_length
    is_infill = (torch.rand(b, generator=generator) < infill_prob) & (c > 1)
    hole = torch.randint(1, max(c, 2), (b,), generator=generator)
    by_line = torch.rand(b, generator=generator) < line_prob
    pick = torch.rand(b, generator=generator)  # which span length / which line end

    start = start.clone()
    span = torch.full((b,), c, dtype=torch.long)
    full_hole = torch.full((b,), c, dtype=torch.long)
    if not bool(is_infill.any()):
        return start, full_hole, span
    left = _target_run_left(batch.loss_mask, batch.ends)
    pos = torch.arange(width)
    breaks = (torch.isin(batch.tokens, newline_ids) if newline_ids is not None and newline_ids.numel()
              else torch.zeros_like(batch.loss_mask))
    breaks &= pos < batch.lengths[:, None]
    for i in is_infill.nonzero().flatten().tolist():
        s, h = int(start[i]), int(hole[i])
        ends = torch.empty(0, dtype=torch.long)
        if by_line[i] and bool(breaks[i].any()):
            line_starts = (F.pad(breaks[i], (1, 0))[:-1] & batch.loss_mask[i]).nonzero().flatten()
            line_starts = line_starts[(line_starts >= s) & (line_starts < s + c)]
            if line_starts.numel():
                s = int(line_starts[0])
            reach = min(h, int(left[i, s]))
            ends = breaks[i, s + 1:s + reach + 1].nonzero().flatten() + 1  # span lengths ending at a break
        if ends.numel():
            m = int(ends[int(pick[i] * ends.numel())])
        else:
            m = 1 + int(pick[i] * min(h, int(left[i, s])))
        start[i], full_hole[i], span[i] = s, h, m
    return start, full_hole, span


def plan_canvases(batch: Batch, canvas_length: int, vocab_size: int, pad_id: int, generator: torch.Generator,
                  eps: float = 1e-3, self_cond_prob: float = 0.5, infill_prob: float = 0.0,
                  fill_id: int | None = None, newline_ids: torch.Tensor | None = None) -> CanvasPlan:
    """Choose and corrupt one canvas per row (on the CPU, from `generator` alone).

    With `infill_prob` > 0 some rows become infill canvases (`infill_layout`; `fill_id` is then required,
    `newline_ids` optional). Its draws come after all of the plain path's, so with `infill_prob == 0` the plan
    and the generator's state are exactly those of a plan without infilling, and with `infill_prob > 0` the
    noise levels, keep masks, noise and self-conditioning rows stay the same as well."""
    b, width = batch.tokens.shape
    c = canvas_length
    start = canvas_starts(batch.loss_mask, c, generator, batch.ends)
    t = eps + (1 - 2 * eps) * torch.rand(b, generator=generator)
    keep = torch.rand(b, c, generator=generator) < (1 - t)[:, None]
    noise = torch.randint(0, vocab_size, (b, c), generator=generator)
    self_cond = torch.rand(b, generator=generator) < self_cond_prob

    j = torch.arange(c)
    if infill_prob > 0:
        if fill_id is None:
            raise ValueError("infilling (infill_prob > 0) needs the filler's id (fill_id)")
        start, hole, span = infill_layout(batch, start, c, infill_prob, newline_ids, generator)
    else:
        hole = span = torch.full((b,), c, dtype=torch.long)
    hole, span = hole[:, None], span[:, None]
    fixed = j >= hole  # the suffix
    filler = (j >= span) & ~fixed
    index = start[:, None] + j - torch.where(fixed, hole - span, 0)  # suffix: the tokens right after the span
    # the end of the example a canvas starts in (packed rows hold several): the places after it target pad, as
    # generation pads a canvas after its EOS, rather than the next example
    pos = torch.arange(width)
    example_end = torch.where(batch.ends & (pos >= start[:, None]), pos, width + c).min(dim=1).values
    beyond = index > example_end[:, None]
    target = torch.where(beyond, pad_id, F.pad(batch.tokens, (0, c), value=pad_id).gather(1, index))
    wanted = F.pad(batch.loss_mask, (0, c)).gather(1, index) | (index >= batch.lengths[:, None]) | beyond
    valid = wanted & (index < width)  # nothing beyond the batch width
    if infill_prob > 0:
        target = torch.where(filler, fill_id, target)
        valid = (valid | filler) & ~fixed
    return CanvasPlan(start, t, torch.where(keep | fixed, target, noise), target, valid, self_cond, fixed)


def canvas_weights(t: torch.Tensor, weighting: str, max_weight: float = 10.0) -> torch.Tensor:
    """Per-row loss weight, clamped to `max_weight`: 1 ("unweighted", base-sft), 1/(1-t) ("inv_t", the design
    notes' variant) or 1/t ("elbo"). With keep probability alpha(t) = 1 - t, the ELBO weight of the masked/uniform
    diffusion cross-entropy is -alpha'(t) / (1 - alpha(t)) = 1/t (MD4, and hackable_diffusion's discrete loss):
    noisier canvases weigh less. "inv_t" weighs them more; both are offered."""
    if weighting == "unweighted":
        return torch.ones_like(t)
    if weighting == "inv_t":
        return (1 / (1 - t)).clamp(max=max_weight)
    if weighting == "elbo":
        return (1 / t).clamp(max=max_weight)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


class TrainingStep(nn.Module):
    """The whole objective as one module: `forward` runs the encoder pass, the decoder passes with
    self-conditioning and both losses. Training calls this module (never the model's passes directly), so hooks on
    it and on the model's layers (FSDP's gather and free of sharded weights) see every use of the weights the
    encoder and decoder share: the stack runs up to three times per step and the embedding is the LM head too.
    """

    def __init__(self, model: DiffusionGemmaModel, weighting: str = "unweighted", diffusion_weight: float = 1.0,
                 ar_weight: float = 1.0):
        super().__init__()
        if diffusion_weight < 0 or ar_weight < 0 or diffusion_weight == ar_weight == 0:
            raise ValueError(f"need weights >= 0, not both 0 (diffusion {diffusion_weight}, ar {ar_weight})")
        self.model = model
        self.weighting, self.diffusion_weight, self.ar_weight = weighting, diffusion_weight, ar_weight

    def forward(self, batch: Batch, plan: CanvasPlan, totals: LossTotals, first_pass: bool | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """diffusion_weight * decoder CE + ar_weight * encoder AR CE for these rows, each a sum over tokens divided
        by the global batch's count (`totals`). Also returns the detached sums and counts (`diffusion_sum`,
        `ar_sum`, `canvas_tokens`, `ar_tokens`) for reporting; sum them over micro-batches and processes.

        `first_pass`: whether the self-conditioning pass runs; by default where any of these rows self-conditions.
        Sharded training passes the same answer on every process (the global batch's), since each pass gathers
        the weights with the others; a row without self-conditioning then gets a zero signal, which the model
        maps to exactly what it computes without one."""
        model = self.model
        hidden, sequence_kv = model.encode_sequence(batch.tokens)
        ar_mask = batch.loss_mask[:, 1:]
        ar_logits = model.logits(hidden[:, :-1][ar_mask])
        ar_sum = F.cross_entropy(ar_logits, batch.tokens[:, 1:][ar_mask], reduction="sum")

        if self.diffusion_weight == 0:  # AR only: no decoder pass
            diffusion_sum = torch.zeros((), device=ar_sum.device, dtype=ar_sum.dtype)
        else:
            context = sequence_kv.at(plan.start)
            first = None
            if bool(plan.self_cond.any()) if first_pass is None else first_pass:
                with torch.no_grad():
                    first = model.denoise(plan.canvas, context)
            logits = model.denoise(plan.canvas, context, first, plan.self_cond if first is not None else None)
            ce = F.cross_entropy(logits[plan.valid], plan.target[plan.valid], reduction="none")
            weights = canvas_weights(plan.t, self.weighting)[:, None].expand_as(plan.valid)[plan.valid]
            diffusion_sum = (ce * weights).sum()

        loss = (self.diffusion_weight * diffusion_sum / totals.canvas_tokens
                + self.ar_weight * ar_sum / totals.ar_tokens)
        sums = {"diffusion_sum": diffusion_sum.detach(), "ar_sum": ar_sum.detach(),
                "canvas_tokens": plan.valid.sum(), "ar_tokens": ar_mask.sum()}
        return loss, sums


def diffusion_gemma_loss(model: DiffusionGemmaModel, batch: Batch, plan: CanvasPlan, totals: LossTotals,
                         weighting: str = "unweighted", diffusion_weight: float = 1.0,
                         ar_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`TrainingStep(model, ...)(batch, plan, totals)`: the loss of these rows and its sums, for one call."""
    return TrainingStep(model, weighting, diffusion_weight, ar_weight)(batch, plan, totals)
