"""Random draws of the canvas sampler: uniform noise tokens and categorical samples.

Either one generator for the whole batch, drawing in exactly the reference's order and shapes (so a
`torch.manual_seed` run reproduces transformers' `generate`), or one generator per row, which makes a
row's tokens independent of what else is in the batch.
"""

from __future__ import annotations

import torch

from .multinomial import multinomial_rows


class CanvasRNG:
    def __init__(self, generators: list[torch.Generator | None] | None = None):
        self.generators = generators

    def tokens(self, batch: int, length: int, vocab_size: int, device: torch.device,
               stopped: torch.Tensor | None = None) -> torch.Tensor:
        """Uniform random token ids [batch, length]. With per-row generators, rows marked in `stopped` [batch]
        draw nothing (their ids are 0): a row's generator advances only while the row denoises, as when it runs
        alone. The batch generator always draws for every row, as the reference does."""
        if self.generators is None:
            return torch.randint(0, vocab_size, (batch, length), device=device)
        return torch.stack([torch.zeros(length, dtype=torch.long, device=device) if skip else
                            torch.randint(0, vocab_size, (length,), device=device, generator=g)
                            for g, skip in zip(self.generators, _idle(stopped, batch))])

    def sample(self, probs: torch.Tensor, used: torch.Tensor | None = None,
               stopped: torch.Tensor | None = None) -> torch.Tensor:
        """One categorical draw per position from probs [B, C, V], as `torch.multinomial` draws it.

        With `used` [B, C], only those positions are computed (the others hold 0); the generators still
        end where drawing every position leaves them, so later draws are unchanged (`multinomial_rows`).
        `stopped` [B]: as for `tokens`, rows whose own generator is left as it is.
        """
        b, c, v = probs.shape
        if used is None:
            used = torch.ones(b, c, dtype=torch.bool, device=probs.device)
        if self.generators is None:
            return multinomial_rows(probs.reshape(-1, v), used.reshape(-1)).view(b, c)
        return torch.stack([torch.zeros(c, dtype=torch.long, device=probs.device) if skip else multinomial_rows(p, u, g)
                            for p, u, g, skip in zip(probs, used, self.generators, _idle(stopped, b))])


def _idle(stopped: torch.Tensor | None, batch: int) -> list[bool]:
    """Per row: its generator stays as it is (the row stopped)."""
    return [False] * batch if stopped is None else stopped.tolist()
