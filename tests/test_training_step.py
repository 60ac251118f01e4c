"""`TrainingStep`: the whole objective as one module's forward (what sharded training hooks into)."""

from __future__ import annotations

import torch

import dgemma
from dgemma.config import preset
from dgemma.train.batches import pad_each
from dgemma.train.data import Example
from dgemma.train.objective import LossTotals, TrainingStep, plan_canvases


def _rows_and_plan(self_cond_prob: float):
    config = preset("tiny")
    g = torch.Generator().manual_seed(3)
    vocab = config.text_config.vocab_size
    rows = pad_each([Example([2] + torch.randint(3, vocab, (30,), generator=g).tolist() + [1], 1, str(i))
                     for i in range(3)], 40, pad_id=0)
    return config, rows, plan_canvases(rows, config.canvas_length, vocab, 0, g, self_cond_prob=self_cond_prob)


def _loss_and_grads(model, rows, plan, **kw):
    model.zero_grad(set_to_none=True)
    loss, sums = TrainingStep(model, "inv_t")(rows, plan, LossTotals.of(rows, plan), **kw)
    loss.backward()
    return loss, sums, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_forced_self_conditioning_pass_without_self_conditioned_rows_changes_no_bit():
    """Sharded training runs the self-conditioning pass on every process when any row of the global batch
    self-conditions; rows without it get a zero signal, which must be exactly the pass without one."""
    config, rows, plan = _rows_and_plan(self_cond_prob=0.0)
    assert not plan.self_cond.any()
    model = dgemma.DiffusionGemma.from_config(config, seed=1).model.train().requires_grad_(True)
    loss, sums, grads = _loss_and_grads(model, rows, plan)
    forced_loss, forced_sums, forced_grads = _loss_and_grads(model, rows, plan, first_pass=True)
    assert torch.equal(loss, forced_loss) and all(torch.equal(sums[k], forced_sums[k]) for k in sums)
    # the self-conditioning MLP now takes part (with zero gradients); every other gradient keeps its bits
    assert set(forced_grads) - set(grads) == {n for n in forced_grads if n.startswith("self_conditioning.")}
    assert all(torch.equal(grads[n], forced_grads[n]) for n in grads)
    assert all(not g.any() for n, g in forced_grads.items() if n not in grads)

