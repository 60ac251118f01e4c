"""`multinomial_rows`: torch.multinomial's picks for the used rows only, the generator left where the full draw leaves it."""

from __future__ import annotations

import pytest
import torch

from dgemma.sampling import CanvasRNG
from dgemma.sampling import multinomial as mn


@pytest.fixture
def fresh(monkeypatch):
    """Each test starts unchecked, so the first call checks the emulation again."""
    monkeypatch.setattr(mn, "_verified", {})


def _probs(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, v, generator=g) * 4, dim=-1)


@pytest.mark.parametrize("n,v,used", [(256, 4096, [0, 5, 6, 7, 100, 255]), (64, 4096, [0, 31, 32, 63]), (3, 2, [1]), (40, 999, []),
                                      (17, 513, list(range(17)))])
def test_used_rows_and_generator_state_equal_torch_multinomial(fresh, n, v, used):
    probs = _probs(n, v, n)
    rows = torch.zeros(n, dtype=torch.bool)
    rows[used] = True
    for call in range(2):  # the first call checks (and answers with torch's own draw), the second emulates
        g = torch.Generator().manual_seed(11 + call)
        want = torch.multinomial(probs, 1, generator=g).squeeze(1)
        want_next = torch.rand(5, generator=g)
        g.manual_seed(11 + call)
        got = mn.multinomial_rows(probs, rows, g)
        assert torch.equal(got[rows], want[rows])
        assert torch.equal(got[~rows], torch.zeros_like(got[~rows]))
        assert torch.equal(torch.rand(5, generator=g), want_next)
    assert mn._verified[torch.float32] is True


def test_global_generator_is_advanced_as_by_torch_multinomial(fresh):
    probs = _probs(64, 300, 0)
    rows = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.2
    mn.multinomial_rows(probs, rows)  # the checking call
    torch.manual_seed(5)
    want = torch.multinomial(probs, 1).squeeze(1)
    want_noise = torch.randint(0, 300, (64,))
    torch.manual_seed(5)
    got = mn.multinomial_rows(probs, rows)
    assert torch.equal(got[rows], want[rows]) and torch.equal(torch.randint(0, 300, (64,)), want_noise)


def test_falls_back_to_torch_multinomial_when_the_check_fails(fresh, monkeypatch):
    real = mn._draw
    monkeypatch.setattr(mn, "_draw", lambda p, r, g: real(p, r, g) + 1)  # an emulation that is off by one
    probs = _probs(8, 50, 2)
    rows = torch.ones(8, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    want = torch.multinomial(probs, 1, generator=g).squeeze(1)
    for _ in range(2):
        g.manual_seed(3)
        assert torch.equal(mn.multinomial_rows(probs, rows, g), want)
    assert mn._verified[torch.float32] is False


def test_invalid_probabilities_raise_torchs_error(fresh):
    rows = torch.ones(2, dtype=torch.bool)
    bad = torch.tensor([[0.5, 0.5], [float("nan"), 1.0]])
    for _ in range(2):
        with pytest.raises(RuntimeError, match="probability tensor contains"):
            mn.multinomial_rows(bad, rows)
    mn.multinomial_rows(_probs(2, 2, 0), rows)
    assert mn._verified[torch.float32] is True
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        mn.multinomial_rows(bad, rows)


def test_canvas_rng_samples_only_used_positions_per_row_generator(fresh):
    probs = torch.softmax(torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(4)), -1)
    used = torch.tensor([[True, False, False, True, False, False], [False] * 6])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    want = torch.stack([torch.multinomial(p, 1, generator=torch.Generator().manual_seed(s)).squeeze(1)
                        for p, s in zip(probs, (1, 2))])
    got = CanvasRNG(gens).sample(probs, used)
    assert torch.equal(got[used], want[used])
    after = [torch.Generator().manual_seed(s) for s in (1, 2)]
    for p, g in zip(probs, after):
        torch.multinomial(p, 1, generator=g)
    assert all(torch.equal(a.get_state(), g.get_state()) for a, g in zip(after, gens))


def test_generate_on_the_cpu_takes_the_emulated_draw(fresh):
    """The fast path is really in use (a build where the check failed would silently draw everything)."""
    import dgemma
    from dgemma.config import preset

    model = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0)
    torch.manual_seed(0)
    model.generate(input_ids=torch.tensor([[2, 5, 6]]), max_new_tokens=32, max_denoising_steps=4)
    assert mn._verified[torch.float32] is True


def test_float64_probabilities_are_checked_and_drawn_on_their_own(fresh):
    probs = _probs(40, 300, 7).double()
    rows = torch.rand(40, generator=torch.Generator().manual_seed(2)) < 0.4
    for call in range(2):
        g = torch.Generator().manual_seed(call)
        want = torch.multinomial(probs, 1, generator=g).squeeze(1)
        state = g.get_state()
        g.manual_seed(call)
        got = mn.multinomial_rows(probs, rows, g)
        assert torch.equal(got[rows], want[rows]) and torch.equal(g.get_state(), state)
    assert mn._verified == {torch.float64: True}


def test_skip_advances_the_generator_as_float64_uniforms(monkeypatch):
    monkeypatch.setattr(mn, "_SKIP_DTYPE", None)  # checked again here
    assert mn._skip_dtype() == torch.int64  # PyTorch's CPU kernels as they are: the cheap skip is taken
    for n in (1, 623, 625, mn._SCRATCH + 7):
        a, b = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        torch.empty(n, dtype=torch.float64).uniform_(generator=a)
        mn._skip(b, n)
        assert torch.equal(a.get_state(), b.get_state())
    real = torch.Tensor.random_

    def random_32_bits(self, generator=None):  # one 32-bit word per element, as int32's random_ takes
        return self.copy_(real(torch.empty(self.shape, dtype=torch.int32), generator=generator))

    monkeypatch.setattr(torch.Tensor, "random_", random_32_bits)
    monkeypatch.setattr(mn, "_SKIP_DTYPE", None)
    assert mn._skip_dtype() == torch.float64  # a random_ that consumes otherwise is not used


@pytest.mark.parametrize("bad,why", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf"),
                                     (-0.25, "negative")])
def test_every_kind_of_invalid_row_raises_and_leaves_the_generator(fresh, bad, why):
    probs = _probs(40, 30, 1)
    rows = torch.zeros(40, dtype=torch.bool)
    rows[[3, 17]] = True
    mn.multinomial_rows(probs, rows)  # the checking call
    probs[17, 4] = bad
    g = torch.Generator().manual_seed(2)
    state = g.get_state()
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        mn.multinomial_rows(probs, rows, g)
    assert torch.equal(g.get_state(), state), why
    zero = _probs(40, 30, 1)
    zero[3] = 0.0
    with pytest.raises(RuntimeError, match="sum of probabilities <= 0"):
        mn.multinomial_rows(zero, rows, g)


def test_rows_whose_sum_overflows_are_still_drawn(fresh):
    probs = torch.full((3, 4), 3e38)  # valid for torch.multinomial, but each row's sum overflows to inf
    rows = torch.tensor([True, False, True])
    mn.multinomial_rows(_probs(3, 4, 0), rows)  # the checking call
    g = torch.Generator().manual_seed(9)
    want = torch.multinomial(probs, 1, generator=g).squeeze(1)
    after = g.get_state()
    g.manual_seed(9)
    global_state = torch.get_rng_state()
    got = mn.multinomial_rows(probs, rows, g)
    assert torch.equal(got[rows], want[rows]) and torch.equal(g.get_state(), after)
    assert torch.equal(torch.get_rng_state(), global_state)  # no stray draw from torch's own generator
