"""One denoising update of a canvas from the decoder's logits — the sampler's policies composed.

Temperature-scale the logits, accept the low-entropy prefix within the bound, sample a token there (or
take the argmax; the generator advances as if every position were sampled, as in the reference), re-noise
the rest, keep fixed positions, freeze rows that already stopped, then test the early stop. Used by the one-request-batch loop and by the continuous-batching scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GenerationConfig
from .acceptance import accept_by_entropy, token_entropy
from .noise import CanvasRNG
from .schedule import linear_temperature
from .stopping import StableAndConfident


@dataclass
class CanvasState:
    """The sampler's state for rows [B] denoising one canvas each."""

    canvas: torch.Tensor  # [B, C] tokens fed to the next decoder pass
    draft: torch.Tensor  # [B, C] argmax of the last pass (what gets committed)
    self_cond: torch.Tensor | None  # [B, C, V] fp32 softmax of the last pass's scaled logits (in cond_dtype)
    done: torch.Tensor  # [B] rows that stopped early
    stopper: StableAndConfident
    fixed: torch.Tensor | None = None  # [B, C] positions whose token is given
    fixed_tokens: torch.Tensor | None = None
    cond_dtype: torch.dtype = torch.float32  # the model's: self-conditioning sees the logits rounded to it

    @classmethod
    def start(cls, canvas: torch.Tensor, gen: GenerationConfig, fixed: torch.Tensor | None = None,
              cond_dtype: torch.dtype = torch.float32) -> "CanvasState":
        has_fixed = fixed is not None and bool(fixed.any())
        return cls(canvas, canvas, None, torch.zeros(canvas.shape[0], dtype=torch.bool, device=canvas.device),
                   StableAndConfident(gen.stability_threshold, gen.confidence_threshold),
                   fixed if has_fixed else None, canvas if has_fixed else None, cond_dtype)


def denoise_update(state: CanvasState, logits: torch.Tensor, steps_left: int, gen: GenerationConfig,
                   rng: CanvasRNG) -> torch.Tensor:
    """Advance `state` by one pass given its logits [B, C, V]; returns the accepted mask [B, C].

    The random draws are the reference's (a categorical sample at every position, then noise tokens), but
    the sample is only computed where it is kept: accepted positions of rows still denoising.
    """
    b, c, vocab = logits.shape
    fixed, done = state.fixed, state.done
    scaled = logits / linear_temperature(steps_left, gen.max_denoising_steps, gen.t_min, gen.t_max)
    draft = scaled.argmax(dim=-1)
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    entropy = token_entropy(scaled)
    if fixed is not None:
        entropy = entropy.masked_fill(fixed, 0.0)  # fixed tokens spend none of the entropy budget
    accepted = accept_by_entropy(entropy, gen.entropy_bound)
    if gen.do_sample:
        used = accepted & ~done[:, None] if fixed is None else accepted & ~done[:, None] & ~fixed
        sampled = rng.sample(probs, used)
    else:
        sampled = draft
    if fixed is not None:
        sampled = torch.where(fixed, state.fixed_tokens, sampled)
        draft = torch.where(fixed, state.fixed_tokens, draft)
    canvas = torch.where(accepted, sampled, rng.tokens(b, c, vocab, logits.device))
    if fixed is not None:
        canvas = torch.where(fixed, state.fixed_tokens, canvas)
        mean_entropy = entropy.sum(-1) / (~fixed).sum(-1).clamp(min=1)
    else:
        mean_entropy = entropy.mean(dim=-1)
    # the next pass's self-conditioning input: the reference hands it the scaled logits in the model's dtype
    cond = probs if state.cond_dtype == torch.float32 else \
        torch.softmax(scaled.to(state.cond_dtype), dim=-1, dtype=torch.float32)
    if done.any():  # rows that already stopped keep their state
        draft = torch.where(done[:, None], state.draft, draft)
        canvas = torch.where(done[:, None], state.canvas, canvas)
        cond = torch.where(done[:, None, None], state.self_cond, cond)
        mean_entropy = torch.where(done, torch.zeros_like(mean_entropy), mean_entropy)
    state.done = done | state.stopper(draft, mean_entropy)
    state.canvas, state.draft, state.self_cond = canvas, draft, cond
    return accepted
