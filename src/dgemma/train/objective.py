"""The DiffusionGemma training loss (design doc section 4, the hackable_diffusion recipe).

Per row, the encoder reads the whole clean sequence; its logits get an autoregressive cross-entropy over the
target tokens. One canvas-aligned block of the target is corrupted with uniform-state noise under a linear
schedule (each token kept with probability alpha(t) = 1 - t, else replaced by a uniform random id) and the decoder
predicts the clean block from the encoder keys/values before it. Canvas positions past the end of the sequence
target pad, so the model learns to finish a canvas after EOS as generation does. Self-conditioning is trained in
two passes: a first decoder pass without gradient whose logits feed the second pass for a random half of rows.

The random choices of a global batch are drawn up front (`plan_canvases`) and the losses are sums divided by
global token counts (`LossTotals`), so the loss is the same however the rows are split across processes or
micro-batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.model import DiffusionGemmaModel
from .batches import Batch

WEIGHTINGS = ("unweighted", "inv_t")
SUM_KEYS = ("diffusion_sum", "ar_sum", "canvas_tokens", "ar_tokens")  # what `diffusion_gemma_loss` reports


@dataclass
class CanvasPlan:
    """The corrupted canvas of each row and what the decoder should produce there."""

    start: torch.Tensor  # [B] position of the canvas's first token
    t: torch.Tensor  # [B] noise level
    canvas: torch.Tensor  # [B, C] decoder input
    target: torch.Tensor  # [B, C] clean tokens (pad past the sequence end)
    valid: torch.Tensor  # [B, C] bool: positions that count in the loss
    self_cond: torch.Tensor  # [B] bool: rows whose second pass sees the first pass's logits

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


def canvas_starts(loss_mask: torch.Tensor, canvas_length: int, generator: torch.Generator) -> torch.Tensor:
    """One start per row, uniform over the canvas-aligned blocks of its target: target positions whose distance
    from the start of their run of target tokens is a multiple of `canvas_length` (where generation would begin
    a canvas after the prompt)."""
    if not bool(loss_mask.any(dim=1).all()):
        raise ValueError("every row needs at least one target token")
    pos = torch.arange(loss_mask.shape[1])
    run_start = loss_mask & ~F.pad(loss_mask, (1, 0))[:, :-1]
    offset = pos - torch.where(run_start, pos, 0).cummax(dim=1).values
    anchors = loss_mask & (offset % canvas_length == 0)
    return torch.multinomial(anchors.float(), 1, generator=generator).squeeze(1)


def plan_canvases(batch: Batch, canvas_length: int, vocab_size: int, pad_id: int, generator: torch.Generator,
                  eps: float = 1e-3, self_cond_prob: float = 0.5) -> CanvasPlan:
    """Choose and corrupt one canvas per row (on the CPU, from `generator` alone)."""
    b, width = batch.tokens.shape
    start = canvas_starts(batch.loss_mask, canvas_length, generator)
    t = eps + (1 - 2 * eps) * torch.rand(b, generator=generator)
    keep = torch.rand(b, canvas_length, generator=generator) < (1 - t)[:, None]
    noise = torch.randint(0, vocab_size, (b, canvas_length), generator=generator)
    self_cond = torch.rand(b, generator=generator) < self_cond_prob

    index = start[:, None] + torch.arange(canvas_length)
    target = F.pad(batch.tokens, (0, canvas_length), value=pad_id).gather(1, index)
    wanted = F.pad(batch.loss_mask, (0, canvas_length)).gather(1, index) | (index >= batch.lengths[:, None])
    valid = wanted & (index < width)  # nothing beyond the batch width
    return CanvasPlan(start, t, torch.where(keep, target, noise), target, valid, self_cond)


def canvas_weights(t: torch.Tensor, weighting: str, max_weight: float = 10.0) -> torch.Tensor:
    """Per-row loss weight: 1 ("unweighted", base-sft) or 1/(1-t) clamped to `max_weight` ("inv_t")."""
    if weighting == "unweighted":
        return torch.ones_like(t)
    if weighting == "inv_t":
        return (1 / (1 - t)).clamp(max=max_weight)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def diffusion_gemma_loss(model: DiffusionGemmaModel, batch: Batch, plan: CanvasPlan, totals: LossTotals,
                         weighting: str = "unweighted", diffusion_weight: float = 1.0,
                         ar_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """diffusion_weight * decoder CE + ar_weight * encoder AR CE for these rows, each a sum over tokens divided by
    the global batch's count. Also returns the detached sums and counts (`diffusion_sum`, `ar_sum`,
    `canvas_tokens`, `ar_tokens`) for reporting; sum them over micro-batches and processes."""
    hidden, sequence_kv = model.encode_sequence(batch.tokens)
    ar_mask = batch.loss_mask[:, 1:]
    ar_logits = model.logits(hidden[:, :-1][ar_mask])
    ar_sum = F.cross_entropy(ar_logits, batch.tokens[:, 1:][ar_mask], reduction="sum")

    context = sequence_kv.at(plan.start)
    first_pass = None
    if bool(plan.self_cond.any()):
        with torch.no_grad():
            first_pass = model.denoise(plan.canvas, context)
    logits = model.denoise(plan.canvas, context, first_pass, plan.self_cond if first_pass is not None else None)
    ce = F.cross_entropy(logits[plan.valid], plan.target[plan.valid], reduction="none")
    weights = canvas_weights(plan.t, weighting)[:, None].expand_as(plan.valid)[plan.valid]
    diffusion_sum = (ce * weights).sum()

    loss = diffusion_weight * diffusion_sum / totals.canvas_tokens + ar_weight * ar_sum / totals.ar_tokens
    sums = {"diffusion_sum": diffusion_sum.detach(), "ar_sum": ar_sum.detach(),
            "canvas_tokens": plan.valid.sum(), "ar_tokens": ar_mask.sum()}
    return loss, sums
