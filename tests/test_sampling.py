"""The sampler's policies, each on its own."""

from __future__ import annotations

import pytest
import torch

from dgemma.sampling import CanvasRNG, StableAndConfident, accept_by_entropy, linear_temperature, token_entropy


def test_linear_temperature_runs_from_t_max_to_t_min():
    assert linear_temperature(10, 10, 0.4, 0.8).item() == pytest.approx(0.8)
    assert linear_temperature(1, 10, 0.4, 0.8).item() == pytest.approx(0.44)
    assert linear_temperature(5, 10, 0.4, 0.8).dtype == torch.float32


def test_token_entropy_matches_categorical():
    logits = torch.randn(3, 7, 50) * 4
    logits[0, 0] = torch.tensor([0.0] + [-float("inf")] * 49)  # a certain position: entropy 0, no NaN
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(token_entropy(logits), expected)
    assert token_entropy(logits)[0, 0] == 0
    finite = torch.randn(2, 256, 4096) * 3  # no -inf: the clamp is skipped, the result is still the same bits
    assert torch.equal(token_entropy(finite), torch.distributions.Categorical(logits=finite).entropy())


def test_accept_by_entropy_takes_the_low_entropy_prefix_within_the_bound():
    entropy = torch.tensor([[0.5, 0.01, 0.03, 2.0, 0.05]])
    # sorted: 0.01, 0.03, 0.05, 0.5, 2.0; cumsum - current: 0, 0.01, 0.04, 0.09, 0.59
    mask = accept_by_entropy(entropy, 0.1)
    assert mask.tolist() == [[True, True, True, False, True]]
    assert accept_by_entropy(entropy, 0.02).tolist() == [[False, True, True, False, False]]


def test_accept_by_entropy_always_accepts_the_most_certain_position():
    entropy = torch.tensor([[5.0, 6.0, 4.0]])
    assert accept_by_entropy(entropy, 1e-9).tolist() == [[False, False, True]]


def test_stable_and_confident_needs_repeats_and_low_entropy():
    stop = StableAndConfident(stability_threshold=2, confidence_threshold=0.1)
    canvas = torch.tensor([[1, 2, 3], [4, 5, 6]])
    low = torch.tensor([0.01, 0.5])
    assert stop(canvas, low).tolist() == [False, False]  # no history yet
    assert stop(canvas, low).tolist() == [False, False]  # one repeat of two
    assert stop(canvas, low).tolist() == [True, False]  # row 1 is never confident
    assert stop(torch.tensor([[1, 2, 0], [4, 5, 6]]), low).tolist() == [False, False]
    stop.reset()
    assert StableAndConfident(0, 0.1)(canvas, low).tolist() == [True, False]


def test_per_row_generators_draw_what_a_seeded_global_generator_draws():
    probs = torch.softmax(torch.randn(2, 5, 30), -1)
    torch.manual_seed(7)
    a_tokens, a_sample = torch.randint(0, 30, (1, 5)), torch.multinomial(probs[1], 1).view(1, 5)
    rng = CanvasRNG([torch.Generator().manual_seed(3), torch.Generator().manual_seed(7)])
    b_tokens = rng.tokens(2, 5, 30, torch.device("cpu"))
    b_sample = rng.sample(probs)
    assert torch.equal(b_tokens[1:], a_tokens) and torch.equal(b_sample[1:], a_sample)


@pytest.mark.parametrize("cond_dtype", [torch.float32, torch.bfloat16])
def test_per_position_in_blocks_gives_the_whole_canvas_bits(cond_dtype, monkeypatch):
    from dgemma.sampling import step

    logits = torch.randn(2, 100, 300, generator=torch.Generator().manual_seed(0)) * 4  # 200 positions: 4 blocks
    blocked = step.per_position(logits, 0.7, cond_dtype)
    monkeypatch.setattr(step, "_BLOCK", 10_000)
    whole = step.per_position(logits, 0.7, cond_dtype)
    assert all(torch.equal(a, b) for a, b in zip(blocked, whole))
    assert torch.equal(whole[0], (logits / 0.7).argmax(-1))


@pytest.mark.parametrize("cond_dtype,do_sample,emulated,per_row,with_fixed,c", [
    (torch.float32, True, True, False, False, 40), (torch.bfloat16, True, True, False, False, 40),
    (torch.float32, False, True, False, False, 40), (torch.float32, True, False, False, False, 40),
    (torch.bfloat16, True, False, False, False, 40), (torch.float32, True, True, True, False, 40),
    (torch.float32, True, False, True, False, 40), (torch.float32, True, True, False, True, 97),
])
def test_update_from_the_rows_still_denoising_equals_the_whole_batch_update(cond_dtype, do_sample, emulated, per_row,
                                                                            with_fixed, c, monkeypatch):
    """`denoise_update(..., rows=...)` with the logits of the rows that have not stopped gives the state, the
    accepted mask and the generator state(s) that the update from every row's logits gives — also where the draw
    falls back to `torch.multinomial` over every row (the stopped rows' probabilities must then be valid), with a
    generator per row, and with fixed (infilling) positions on a canvas that is not a whole number of blocks."""
    from dgemma.config import GenerationConfig
    from dgemma.sampling import multinomial
    from dgemma.sampling.step import CanvasState, denoise_update

    monkeypatch.setattr(multinomial, "_verified", {torch.float32: emulated})
    g = torch.Generator().manual_seed(1)
    b, v = 6, 50  # 6 x c positions: several blocks, runs of rows split across them
    gen = GenerationConfig(max_denoising_steps=8, do_sample=do_sample, entropy_bound=2.0)
    logits = torch.randn(b, c, v, generator=g) * 3
    canvas, draft = torch.randint(0, v, (2, b, c), generator=g)
    self_cond = torch.softmax(torch.randn(b, c, v, generator=g), -1)
    fixed = torch.rand(b, c, generator=g) < 0.3 if with_fixed else None
    done = torch.tensor([False, True, False, False, True, True])
    rows = (~done).nonzero().flatten()
    ends = []
    for part in (False, True):
        state = CanvasState.start(canvas, gen, fixed, cond_dtype=cond_dtype)
        state.draft, state.self_cond, state.done = draft, self_cond.clone(), done.clone()
        torch.manual_seed(4)
        gens = [torch.Generator().manual_seed(10 + i) for i in range(b)] if per_row else None
        accepted = denoise_update(state, logits[rows] if part else logits, 5, gen, CanvasRNG(gens),
                                  rows if part else None)
        states = [x.get_state() for x in gens] if per_row else [torch.get_rng_state()]
        ends.append((state.canvas, state.draft, state.self_cond, state.done, accepted, *states))
    for whole, part in zip(*ends):
        assert torch.equal(whole, part)
    assert not ends[1][4][done].any()  # a stopped row accepts nothing
