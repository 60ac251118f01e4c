"""Infilling (`suffix`): one canvas holding a hole the model fills, then the suffix as fixed positions.

The canvas after the prompt is laid out as `[hole ; suffix ; tail]`:

- `hole`: `min(max_tokens, C - len(suffix))` free positions; the completion is what the model writes here
  (cut at a stop token or stop string). Every place of the hole is the model's to fill.
- `suffix`: the suffix's tokens at fixed positions: never re-noised, always committed. Being bidirectional,
  every pass sees them, so the hole is written to lead into them.
- `tail`: the rest of the canvas, free as well; the model continues past the suffix there, and that is
  dropped.

The free positions start from exactly the noise the sampler would have drawn for this canvas (the
request's seed, first draw), so an infill differs from a plain completion only by the suffix it sees.
Generation is that one canvas: a suffix has at most C - 1 tokens, a hole at most C - len(suffix).
"""

from __future__ import annotations

import torch

from ..engine.generate import CanvasSpec
from ..sampling import CanvasRNG


def hole_size(max_tokens: int, suffix_tokens: int, canvas_length: int) -> int:
    return min(max_tokens, canvas_length - suffix_tokens)


def infill_canvas(suffix: list[int], hole: int, canvas_length: int, vocab_size: int, seed: int,
                  device: torch.device) -> CanvasSpec:
    """The starting canvas [1, C] and its fixed positions for a hole of `hole` places before `suffix`."""
    if not 1 <= hole <= canvas_length - len(suffix):
        raise ValueError(f"a hole of {hole} and a suffix of {len(suffix)} tokens do not fit a canvas of "
                         f"{canvas_length}")
    noise = CanvasRNG([torch.Generator(device).manual_seed(seed)]).tokens(1, canvas_length, vocab_size, device)
    fixed = torch.zeros(1, canvas_length, dtype=torch.bool, device=device)
    fixed[0, hole:hole + len(suffix)] = True
    tokens = noise.clone()
    tokens[0, hole:hole + len(suffix)] = torch.tensor(suffix, dtype=torch.long, device=device)
    return CanvasSpec(tokens, fixed)
