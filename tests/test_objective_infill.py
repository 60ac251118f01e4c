"""Infill canvases (`--infill-prob`) and the AR-only baseline (`--diffusion-weight 0`)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

import dgemma
from dgemma import ConfigError
from dgemma.cli import main
from dgemma.config import preset
from dgemma.tokenizer import byte_tokenizer
from dgemma.train import TrainConfig, objective, train
from dgemma.train.batches import Batch, pad_each
from dgemma.train.data import Example
from dgemma.train.loop import InfillIds
from dgemma.train.objective import LossTotals, diffusion_gemma_loss, infill_layout, plan_canvases

FILL, NL, PAD, EOS = 4, 10, 0, 1


def _plan_before_infill(batch, canvas_length, vocab_size, pad_id, generator, eps=1e-3, self_cond_prob=0.5):
    """`plan_canvases` as it was before infilling, frozen: the plain path must draw and build exactly this."""
    b, width = batch.tokens.shape
    start = objective.canvas_starts(batch.loss_mask, canvas_length, generator)
    t = eps + (1 - 2 * eps) * torch.rand(b, generator=generator)
    keep = torch.rand(b, canvas_length, generator=generator) < (1 - t)[:, None]
    noise = torch.randint(0, vocab_size, (b, canvas_length), generator=generator)
    self_cond = torch.rand(b, generator=generator) < self_cond_prob
    index = start[:, None] + torch.arange(canvas_length)
    target = F.pad(batch.tokens, (0, canvas_length), value=pad_id).gather(1, index)
    wanted = F.pad(batch.loss_mask, (0, canvas_length)).gather(1, index) | (index >= batch.lengths[:, None])
    valid = wanted & (index < width)
    return start, t, torch.where(keep, target, noise), target, valid, self_cond


def _random_rows(seed: int, n: int = 6, width: int = 40) -> Batch:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        body = torch.randint(5, 60, (int(torch.randint(4, width - 2, (1,), generator=g)),), generator=g)
        body[torch.rand(body.shape, generator=g) < 0.15] = NL
        examples.append(Example([2] + body.tolist() + [EOS], int(torch.randint(0, 4, (1,), generator=g)), str(i)))
    return pad_each(examples, width, PAD)


def _layout(plan, i: int) -> tuple[int, int]:
    """(hole H, span m) of row i, read back from the plan."""
    hole = int((~plan.fixed[i]).sum())
    fills = (plan.target[i, :hole] == FILL).nonzero().flatten()
    return hole, int(fills[0]) if fills.numel() else hole


@pytest.mark.parametrize("seed", range(4))
def test_without_infilling_the_plan_and_its_draws_are_unchanged(seed):
    rows = _random_rows(seed)
    g_old, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    old = _plan_before_infill(rows, 8, 512, PAD, g_old)
    new = plan_canvases(rows, 8, 512, PAD, g_new)
    for a, b in zip(old, (new.start, new.t, new.canvas, new.target, new.valid, new.self_cond)):
        assert torch.equal(a, b)
    assert not bool(new.fixed.any())
    assert torch.equal(g_old.get_state(), g_new.get_state())  # nothing more was drawn


def test_infilling_keeps_the_plain_draws():
    rows = _random_rows(7)
    plain = plan_canvases(rows, 8, 512, PAD, torch.Generator().manual_seed(3))
    mixed = plan_canvases(rows, 8, 512, PAD, torch.Generator().manual_seed(3), infill_prob=0.5, fill_id=FILL,
                          newline_ids=torch.tensor([NL]))
    assert torch.equal(plain.t, mixed.t) and torch.equal(plain.self_cond, mixed.self_cond)
    plain_rows = ~mixed.fixed.any(dim=1)
    assert 0 < int(plain_rows.sum()) < len(rows)
    for name in ("start", "canvas", "target", "valid"):
        assert torch.equal(getattr(plain, name)[plain_rows], getattr(mixed, name)[plain_rows]), name


def test_infill_plan_layout_by_hand(monkeypatch):
    # prompt of 2, target 11..18 then EOS, padded to 16; canvas of 8 at position 2, hole of 5 holding 3 tokens
    rows = pad_each([Example([2, 50, 11, 12, 13, 14, 15, 16, 17, 18, EOS], 2, "x")], 16, PAD)
    monkeypatch.setattr(objective, "infill_layout",
                        lambda *_: (torch.tensor([2]), torch.tensor([5]), torch.tensor([3])))
    plan = plan_canvases(rows, 8, 512, PAD, torch.Generator().manual_seed(0), infill_prob=1.0, fill_id=FILL)
    assert plan.start.tolist() == [2]
    #                               span        fill x 2   suffix: the tokens after the span, fixed
    assert plan.target.tolist() == [[11, 12, 13, FILL, FILL, 14, 15, 16]]
    assert plan.fixed.tolist() == [[False] * 5 + [True] * 3]
    assert plan.valid.tolist() == [[True] * 5 + [False] * 3]  # the hole (fillers too) is learnt, not the suffix
    assert plan.canvas[0, 5:].tolist() == [14, 15, 16]  # the suffix is clean whatever t is

    # a suffix running past the end of the sequence: EOS, then pad (fixed, not in the loss)
    monkeypatch.setattr(objective, "infill_layout",
                        lambda *_: (torch.tensor([8]), torch.tensor([2]), torch.tensor([1])))
    plan = plan_canvases(rows, 8, 512, PAD, torch.Generator().manual_seed(0), infill_prob=1.0, fill_id=FILL)
    assert plan.target.tolist() == [[17, FILL, 18, EOS, PAD, PAD, PAD, PAD]]
    assert plan.valid.tolist() == [[True, True] + [False] * 6]
    assert plan.canvas[0, 2:].tolist() == [18, EOS, PAD, PAD, PAD, PAD]


@pytest.mark.parametrize("seed", range(6))
def test_infill_plans_hold_span_fill_and_suffix(seed):
    rows = _random_rows(seed, n=16)
    c = 8
    plan = plan_canvases(rows, c, 512, PAD, torch.Generator().manual_seed(seed), infill_prob=1.0, fill_id=FILL,
                         newline_ids=torch.tensor([NL]))
    padded = F.pad(rows.tokens, (0, c), value=PAD)
    for i in range(len(rows)):
        s = int(plan.start[i])
        hole, m = _layout(plan, i)
        assert 1 <= m <= hole <= c - 1
        assert bool(rows.loss_mask[i, s:s + m].all())  # the span is target tokens only
        assert plan.target[i, :m].tolist() == rows.tokens[i, s:s + m].tolist()
        assert plan.target[i, m:hole].tolist() == [FILL] * (hole - m)
        assert plan.target[i, hole:].tolist() == padded[i, s + m:s + m + c - hole].tolist()
        assert plan.fixed[i].tolist() == [False] * hole + [True] * (c - hole)
        assert plan.valid[i].tolist() == [True] * hole + [False] * (c - hole)
        assert torch.equal(plan.canvas[i, hole:], plan.target[i, hole:])


def test_line_spans_are_whole_lines_ending_before_the_line_break():
    # lines of 3 tokens then a break: BOS 30 31 32 NL 34 35 36 NL ...; the canvas block starts mid-line
    tokens = [2] + [30 + k if k % 4 != 3 else NL for k in range(39)]
    rows = pad_each([Example(tokens, 1, "x")] * 64, 40, PAD)
    g = torch.Generator().manual_seed(0)
    start = torch.full((64,), 2)
    starts, holes, spans = infill_layout(rows, start, 8, 1.0, torch.tensor([NL]), g, line_prob=1.0)
    assert starts.tolist() == [5] * 64  # moved to the first line start in the block (just after the NL at 4)
    for h, m in zip(holes.tolist(), spans.tolist()):
        if h >= 3:  # a line fits in the hole: the span is 1 or 2 whole lines, ending before a break
            assert m in (3, 7) and m <= h and tokens[5 + m] == NL
        else:
            assert 1 <= m <= h
    assert {3, 7} <= set(spans.tolist())

    # without line alignment the span is uniform and the start stays
    starts, holes, spans = infill_layout(rows, start, 8, 1.0, torch.tensor([NL]), g, line_prob=0.0)
    assert starts.tolist() == [2] * 64 and all(1 <= m <= h for h, m in zip(holes.tolist(), spans.tolist()))


def test_infilling_needs_a_filler():
    rows = _random_rows(0)
    with pytest.raises(ValueError, match="fill_id"):
        plan_canvases(rows, 8, 512, PAD, torch.Generator().manual_seed(0), infill_prob=0.5)

    class NoFiller:
        vocab_size = 512

        def token_to_id(self, token):
            return None

    with pytest.raises(ConfigError, match=re.escape("filler token <|fill|>")):
        InfillIds.of(NoFiller(), 512)


def test_infill_ids_of_dgemma_tokenizers():
    ids = InfillIds.of(byte_tokenizer(), 512)
    assert ids.fill == 4 and ids.newlines.tolist() == [256 + ord("\n")]


def test_ar_only_loss_runs_no_decoder_pass(monkeypatch):
    model = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0).model
    rows = _random_rows(1)
    plan = plan_canvases(rows, 32, 512, PAD, torch.Generator().manual_seed(0))
    totals = LossTotals.of(rows, plan)
    _, both = diffusion_gemma_loss(model, rows, plan, totals)

    def no_decoder(*args, **kwargs):
        raise AssertionError("the decoder ran")

    monkeypatch.setattr(model, "denoise", no_decoder)
    loss, sums = diffusion_gemma_loss(model, rows, plan, totals, diffusion_weight=0.0, ar_weight=0.5)
    assert loss.item() == pytest.approx(0.5 * both["ar_sum"].item() / totals.ar_tokens, rel=1e-6)
    assert sums["diffusion_sum"].item() == 0 and sums["canvas_tokens"] == plan.valid.sum()
    with pytest.raises(ValueError, match="not both 0"):
        diffusion_gemma_loss(model, rows, plan, totals, diffusion_weight=0.0, ar_weight=0.0)


SMALL = dict(model="tiny", batch_size=4, seq_len=32, warmup=1, steps=2, holdout_frac=0.25, eval_every=2,
             eval_batches=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (root / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(6)))
    return root


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_runs_with_infilling(corpus, tmp_path):
    train(TrainConfig(data=[str(corpus)], out=str(tmp_path), infill_prob=0.5, **SMALL))
    records = _metrics(tmp_path)
    assert all(r["diffusion_loss"] > 0 for r in records if "loss" in r)
    assert [r["step"] for r in records if "eval_diffusion_loss" in r] == [2]


def test_ar_only_training_reports_no_diffusion_loss(corpus, tmp_path, monkeypatch):
    from dgemma.model.model import DiffusionGemmaModel

    def no_decoder(*args, **kwargs):
        raise AssertionError("the decoder ran")

    monkeypatch.setattr(DiffusionGemmaModel, "denoise", no_decoder)
    train(TrainConfig(data=[str(corpus)], out=str(tmp_path), diffusion_weight=0.0, **SMALL))
    records = _metrics(tmp_path)
    steps, evals = [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]
    assert len(steps) == 2 and len(evals) == 1
    assert all("diffusion_loss" not in r and r["loss"] == r["ar_loss"] for r in steps)
    assert "eval_diffusion_loss" not in evals[0] and evals[0]["eval_loss"] == evals[0]["eval_ar_loss"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_plain_progress_lines_without_a_diffusion_loss(tmp_path, monkeypatch, capsys):
    from dgemma.train import report

    monkeypatch.setattr(report, "_tqdm", lambda: None)
    reporter = report.Reporter(tmp_path, 0, 2, log_every=1)
    reporter.step({"step": 1, "loss": 2.0, "ar_loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0})
    reporter.step({"step": 2, "loss": 3.0, "diffusion_loss": 4.0, "ar_loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0})
    err = capsys.readouterr().err
    assert "loss 2.0000 (ar 2.0000)" in err and "loss 3.0000 (diffusion 4.0000, ar 2.0000)" in err
    assert reporter.close() is not None


@pytest.mark.parametrize("flags, message", [
    (["--diffusion-weight", "0", "--ar-weight", "0"], "not both 0"),
    (["--diffusion-weight", "-1"], "--diffusion-weight >= 0"),
    (["--ar-weight", "-0.5"], "--ar-weight >= 0"),
    (["--infill-prob", "1.5"], "--infill-prob must be in"),
    (["--infill-prob", "0.5", "--diffusion-weight", "0"], "--diffusion-weight 0 turns off"),
])
def test_cli_refuses_bad_loss_settings(flags, message, tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu", *flags])
    assert code == 1
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not both 0"):
        TrainConfig(data=["x"], out="y", diffusion_weight=0, ar_weight=0).validate(1)
