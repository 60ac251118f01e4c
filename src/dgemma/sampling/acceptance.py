"""Entropy-bound acceptance (https://arxiv.org/abs/2505.24857): accept the longest low-entropy prefix of
positions whose summed entropy, minus the largest one, stays within the bound, so the accepted tokens are
close to independent given the context."""

from __future__ import annotations

import torch


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, as `torch.distributions.Categorical` computes it (the same
    ops, bit for bit, with fewer temporaries)."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(log_probs, dim=-1)
    lowest = torch.finfo(log_probs.dtype).min
    # the clamp only changes -inf: on the CPU it is skipped when there is none (on a GPU it is cheaper than the
    # host sync that the test needs)
    if log_probs.is_cuda or not bool(log_probs.amin() > lowest):
        log_probs = log_probs.clamp(min=lowest)
    return -(log_probs.mul_(probs)).sum(-1)


def accept_by_entropy(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Bool mask [B, C]: positions sorted by entropy (low first), prefix with cumsum(H) - H_current <= bound.

    The lowest-entropy position is always accepted, so every step makes progress.
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
