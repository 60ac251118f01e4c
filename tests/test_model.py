"""The model's training view equals its inference view."""

from __future__ import annotations

import torch

import dgemma
from dgemma.config import preset
from dgemma.engine.cache import KVCache


def test_sequence_context_matches_the_cache_at_any_canvas_start():
    """encode_sequence + denoise(at start s) is what prefill of tokens[:s] + denoise gives, for every row's s."""
    m = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=1).model
    tokens = torch.randint(3, 512, (3, 60), generator=torch.Generator().manual_seed(0))
    starts = torch.tensor([5, 31, 44])  # before, around and beyond the 16-token sliding window
    canvas = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))
    self_cond = torch.randn(3, 32, 512)
    hidden, context = m.encode_sequence(tokens)
    got = m.denoise(canvas, context.at(starts), self_cond, self_cond_mask=torch.tensor([True, False, True]))
    for row, s in enumerate(starts.tolist()):
        cache = KVCache(m.text, 1, s, 32)
        prefix_hidden = m.encode(tokens[row:row + 1, :s], cache)
        assert torch.allclose(prefix_hidden[0], hidden[row, :s], atol=1e-5)
        sc = self_cond[row:row + 1] if row != 1 else None
        expected = m.denoise(canvas[row:row + 1], cache, sc)
        assert torch.allclose(got[row], expected[0], atol=1e-4), row


def test_training_pass_has_gradients_everywhere():
    m = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=1).model.train().requires_grad_(True)
    tokens = torch.randint(3, 512, (2, 40))
    hidden, context = m.encode_sequence(tokens)
    logits = m.denoise(torch.randint(0, 512, (2, 32)), context.at(torch.tensor([3, 8])), torch.randn(2, 32, 512))
    (logits.logsumexp(-1).mean() + m.logits(hidden).logsumexp(-1).mean()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
