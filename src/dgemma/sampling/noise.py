"""Random draws of the canvas sampler: uniform noise tokens and categorical samples.

Either one generator for the whole batch, drawing in exactly the reference's order and shapes (so a
`torch.manual_seed` run reproduces transformers' `generate`), or one generator per row, which makes a
row's tokens independent of what else is in the batch.
"""

from __future__ import annotations

import torch


class CanvasRNG:
    def __init__(self, generators: list[torch.Generator | None] | None = None):
        self.generators = generators

    def tokens(self, batch: int, length: int, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Uniform random token ids [batch, length]."""
        if self.generators is None:
            return torch.randint(0, vocab_size, (batch, length), device=device)
        return torch.stack([torch.randint(0, vocab_size, (length,), device=device, generator=g)
                            for g in self.generators])

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """One categorical draw per position from probs [B, C, V]."""
        b, c, v = probs.shape
        if self.generators is None:
            return torch.multinomial(probs.view(-1, v), num_samples=1).view(b, c)
        return torch.stack([torch.multinomial(p, num_samples=1, generator=g).squeeze(-1)
                            for p, g in zip(probs, self.generators)])
