"""`benchmarks/decode.py` on the command line: bad input ends in one error line before any model is built."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import dgemma

DECODE = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"


@pytest.fixture
def decode(monkeypatch):
    """benchmarks/decode.py as a module (it puts benchmarks/ on sys.path for `common`; both are undone after)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    spec = importlib.util.spec_from_file_location("bench_decode", DECODE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("common", None)


def _one_error_line(err: str) -> str:
    assert err.startswith("decode.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--model", "nosuch"], "--model nosuch: no such model directory"),
    (["--model", "tiny"], "--model tiny: a preset, not a checkpoint (use --preset tiny)"),
    (["--model", "{tmp}"], "--model {tmp}: no config.json there (not a checkpoint directory)"),
    (["--preset", "nosuch"], "argument --preset: invalid choice: 'nosuch'"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--plot", "{tmp}/missing/p.png"], "--plot {tmp}/missing/p.png: directory {tmp}/missing does not exist"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    (["--device", "nosuch"], "invalid --device 'nosuch'"),
])
def test_decode_refuses_bad_input_before_building_a_model(argv, message, decode, tmp_path, monkeypatch, capsys):
    def build(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(dgemma.DiffusionGemma, "from_config", build)
    monkeypatch.setattr(dgemma.DiffusionGemma, "from_pretrained", build)
    with pytest.raises(SystemExit) as exit_:
        decode.main([a.format(tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and message.format(tmp=tmp_path) in _one_error_line(err)


def test_decode_reports_what_the_library_rejects_in_one_line(decode, capsys):
    code = decode.cli(["--preset", "tiny", "--prompt-len", "5000", "--systems", "dgemma", "--max-new-tokens", "32",
                       "--repeats", "1", "--warmup", "0"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert "exceeds the model context of 4096" in _one_error_line(err.splitlines(keepends=True)[-1])
