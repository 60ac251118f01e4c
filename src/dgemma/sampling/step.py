"""One denoising update of a canvas from the decoder's logits — the sampler's policies composed.

Temperature-scale the logits, sample a token everywhere (or take the argmax), accept the low-entropy
prefix within the bound, re-noise the rest, keep fixed positions, freeze rows that already stopped,
then test the early stop. Used by the one-request-batch loop and by the continuous-batching scheduler.
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
    self_cond: torch.Tensor | None  # [B, C, V] scaled logits of the last pass
    done: torch.Tensor  # [B] rows that stopped early
    stopper: StableAndConfident
    fixed: torch.Tensor | None = None  # [B, C] positions whose token is given
    fixed_tokens: torch.Tensor | None = None

    @classmethod
    def start(cls, canvas: torch.Tensor, gen: GenerationConfig, fixed: torch.Tensor | None = None) -> "CanvasState":
        has_fixed = fixed is not None and bool(fixed.any())
        return cls(canvas, canvas, None, torch.zeros(canvas.shape[0], dtype=torch.bool, device=canvas.device),
                   StableAndConfident(gen.stability_threshold, gen.confidence_threshold),
                   fixed if has_fixed else None, canvas if has_fixed else None)


def denoise_update(state: CanvasState, logits: torch.Tensor, steps_left: int, gen: GenerationConfig,
                   rng: CanvasRNG) -> torch.Tensor:
    """Advance `state` by one pass given its logits [B, C, V]; returns the accepted mask [B, C]."""
    b, c, vocab = logits.shape
    fixed, done = state.fixed, state.done
    scaled = logits / linear_temperature(steps_left, gen.max_denoising_steps, gen.t_min, gen.t_max)
    draft = scaled.argmax(dim=-1)
    sampled = rng.sample(torch.softmax(scaled, dim=-1, dtype=torch.float32)) if gen.do_sample else draft
    entropy = token_entropy(scaled)
    if fixed is not None:
        entropy = entropy.masked_fill(fixed, 0.0)  # fixed tokens spend none of the entropy budget
        sampled = torch.where(fixed, state.fixed_tokens, sampled)
        draft = torch.where(fixed, state.fixed_tokens, draft)
    accepted = accept_by_entropy(entropy, gen.entropy_bound)
    kept = torch.where(accepted, sampled, state.canvas)
    canvas = torch.where(accepted, kept, rng.tokens(b, c, vocab, logits.device))
    if fixed is not None:
        canvas = torch.where(fixed, state.fixed_tokens, canvas)
        mean_entropy = entropy.sum(-1) / (~fixed).sum(-1).clamp(min=1)
    else:
        mean_entropy = entropy.mean(dim=-1)
    if done.any():  # rows that already stopped keep their state
        draft = torch.where(done[:, None], state.draft, draft)
        canvas = torch.where(done[:, None], state.canvas, canvas)
        scaled = torch.where(done[:, None, None], state.self_cond, scaled)
        mean_entropy = torch.where(done, torch.zeros_like(mean_entropy), mean_entropy)
    state.done = done | state.stopper(draft, mean_entropy)
    state.canvas, state.draft, state.self_cond = canvas, draft, scaled
    return accepted
