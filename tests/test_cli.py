"""The `dgemma` command line: generate (text, JSON, AR, live canvas, chat/thinking, stdin), info, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from dgemma.cli import canvas_view, generate, main
from dgemma.cli import info as info_command
from dgemma.tokenizer import byte_tokenizer

FAST = ["--model", "tiny", "--max-new-tokens", "32", "--steps", "4", "--seed", "0", "--device", "cpu"]



def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, "generate", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dgemma: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]


# -- generate ---------------------------------------------------------------------------------------

def test_generate_prints_text_and_stats(capsys):
    code, out, err = run(capsys, "generate", "Hello there", *FAST)
    assert code == 0, err
    assert out.strip()
    assert err.count("random weights") == 1  # the preset note, shown once
    stats = err.strip().splitlines()[-1]
    assert "passes/canvas" in stats and "tokens/forward" in stats and "tok/s" in stats


def test_generate_json(capsys):
    doc = run_json(capsys, "Hello there", *FAST)
    stats = doc["stats"]
    assert stats["mode"] == "diffusion"
    assert stats["tokens_per_forward"] > 0
    assert len(stats["passes_per_canvas"]) == 1 and 1 <= stats["passes_per_canvas"][0] <= 4
    assert stats["decoder_passes"] == sum(stats["passes_per_canvas"])
    assert stats["wall_time_s"] > 0 and stats["tokens_per_s"] > 0
    assert doc["tokens"] and all(isinstance(t, int) for t in doc["tokens"])
    assert isinstance(doc["text"], str)
    assert "reasoning" not in doc


def test_same_seed_same_tokens(capsys):
    a = run_json(capsys, "Hello there", *FAST)
    b = run_json(capsys, "Hello there", *FAST)
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]


def test_canvas_length_override(capsys):
    doc = run_json(capsys, "Hello there", *FAST, "--canvas-length", "8")
    assert doc["stats"]["canvas_length"] == 8
    assert 1 <= doc["stats"]["canvases"] <= 4


def test_mode_ar(capsys):
    doc = run_json(capsys, "Hello there", *FAST, "--mode", "ar")
    assert doc["stats"]["mode"] == "ar"
    assert doc["stats"]["tokens_per_forward"] <= 1.0
    assert doc["tokens"]
    code, out, err = run(capsys, "generate", "Hello there", *FAST, "--mode", "ar")
    assert code == 0 and out.strip() and "autoregressive" in err


def test_show_canvas_not_a_tty_prints_one_line_per_step(capsys):
    doc = run_json(capsys, "Hello there", *FAST, "--max-new-tokens", "64")
    code, out, err = run(capsys, "generate", "Hello there", *FAST, "--max-new-tokens", "64", "--show-canvas")
    assert code == 0, err
    assert "\x1b" not in out
    steps = [line for line in out.splitlines() if line.startswith("[canvas ")]
    assert len(steps) == doc["stats"]["decoder_passes"] == sum(doc["stats"]["passes_per_canvas"])
    first_canvas = [s for s in steps if s.startswith("[canvas 0 ")]
    assert len(first_canvas) == doc["stats"]["passes_per_canvas"][0]
    assert "step  1" in steps[0]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_canvas_on_a_tty_redraws_in_place(capsys, monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stdout", tty)
    assert main(["generate", "Hello there", *FAST, "--show-canvas"]) == 0
    out = tty.getvalue()
    assert canvas_view._ACCEPTED in out  # accepted positions highlighted
    assert "\x1b[J" in out  # the previous draft is cleared before each redraw
    assert out.count("\x1b[?25l") == 1 and out.count("\x1b[?25h") == 1  # cursor hidden, then shown again


def test_chat_and_thinking(capsys):
    plain = run_json(capsys, "Hello there", *FAST)
    chat = run_json(capsys, "Hello there", *FAST, "--chat")
    thinking = run_json(capsys, "Hello there", *FAST, "--thinking")
    assert plain["prompt_tokens"] < chat["prompt_tokens"]
    assert chat["prompt_tokens"] != thinking["prompt_tokens"]
    code, out, err = run(capsys, "generate", "Hello there", *FAST, "--thinking")
    assert code == 0, err
    assert "tokens/forward" in err


def test_split_thinking_keeps_reasoning_apart():
    tok = byte_tokenizer()
    ids = tok.encode("<|channel>thought\nLet me think.<channel|>The answer.<pad>", add_bos=False)
    reasoning, answer = generate.split_thinking(tok, ids)
    assert reasoning == "Let me think."
    assert answer == "The answer."


def scripted_generation(monkeypatch, text: str, canvas: int = 32) -> None:
    """Make the model 'generate' `text` (split over canvases, a UTF-8 character across the boundary)."""
    from dgemma.api import DiffusionGemma
    from dgemma.engine.generate import CanvasCommit, DenoiseStep, GenerationResult, GenerationStats

    ids = byte_tokenizer().encode(text, add_bos=False)
    n = -(-len(ids) // canvas)
    ids = ids + [0] * (n * canvas - len(ids))

    def fake(self, input_ids, generation_config=None, seed=None, **kwargs):
        for ci in range(n):
            row = torch.tensor([ids[ci * canvas:(ci + 1) * canvas]])
            yield DenoiseStep(ci, 1, row, torch.ones_like(row, dtype=torch.bool), torch.tensor([False]))
            yield CanvasCommit(ci, row, torch.tensor([ci == n - 1]), torch.tensor([1]))
        stats = GenerationStats([[1] * n], [n], [len(ids)], [len(ids) / n], 0.01, 0.01)
        yield GenerationResult([ids], stats)

    monkeypatch.setattr(DiffusionGemma, "stream_generate", fake)


def test_streamed_text_stops_at_end_of_turn(capsys, monkeypatch):
    scripted_generation(monkeypatch, "x" * 31 + "é and more<bos> text<turn|>never shown<eos>")
    code, out, err = run(capsys, "generate", "Hi", *FAST, "--max-new-tokens", "64")
    assert code == 0, err
    assert out == "x" * 31 + "é and more text\n"


def test_thinking_prints_reasoning_separately(capsys, monkeypatch):
    scripted_generation(monkeypatch, "<|channel>thought\nLet me think.<channel|>The answer.<turn|>")
    code, out, err = run(capsys, "generate", "Hi", *FAST, "--thinking")
    assert code == 0, err
    assert out == "The answer.\n"
    assert "Let me think." in err
    doc = run_json(capsys, "Hi", *FAST, "--thinking")
    assert doc["reasoning"] == "Let me think." and doc["text"] == "The answer." and doc["stopped"]


@pytest.mark.parametrize("arg", [None, "-"])
def test_prompt_from_stdin(capsys, monkeypatch, arg):
    direct = run_json(capsys, "Hello there", *FAST)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    argv = ([arg] if arg else []) + FAST
    piped = run_json(capsys, *argv)
    assert piped["prompt_tokens"] == direct["prompt_tokens"]
    assert piped["tokens"] == direct["tokens"]


def test_generate_from_a_checkpoint_directory(capsys, tmp_path):
    from dgemma import DiffusionGemma

    DiffusionGemma.from_pretrained("tiny").save_pretrained(tmp_path)
    capsys.readouterr()
    code, out, err = run(capsys, "generate", "Hello", *FAST, "--model", str(tmp_path))  # the last --model wins
    assert code == 0, err
    assert "random weights" not in err


# -- info -------------------------------------------------------------------------------------------

def test_info_tiny(capsys):
    code, out, err = run(capsys, "info", "tiny")
    assert code == 0, err
    assert "4 (2 sliding, 2 full attention)" in out
    for word in ("parameters", "active", "bfloat16", "int4", "KV cache", "canvas length"):
        assert word in out


def test_info_26b_json(capsys):
    code, out, err = run(capsys, "info", "26b-a4b", "--json")
    assert code == 0, err
    info = json.loads(out)
    params = info["parameters"]
    assert 25.0e9 <= params["total"] <= 26.5e9
    assert 3.5e9 <= params["active"] <= 4.2e9
    cfg = info["config"]
    assert (cfg["layers"], cfg["sliding_layers"], cfg["full_layers"]) == (30, 25, 5)
    assert cfg["full_attention"] == {"layers": 5, "kv_heads": 2, "head_dim": 512, "values_are_keys": True}
    assert info["weights_bytes"]["bfloat16"] == 2 * params["total"]
    assert info["weights_bytes"]["int4"] == params["total"] // 2
    assert info["kv_cache_bf16"]["bytes_per_1k_tokens_full_layers"] == 5 * 2 * 2 * 512 * 2 * 1024


def test_info_reads_only_config_json(capsys, tmp_path):
    from dgemma.config import preset

    preset("tiny").save(tmp_path)  # no weights, no tokenizer
    code, out, err = run(capsys, "info", str(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(out)["source"] == "directory"


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, words", [
    (["--steps", "0"], ["max_denoising_steps"]),
    (["--entropy-bound", "0"], ["entropy_bound"]),
    (["--t-min", "0.9", "--t-max", "0.5"], ["t_min", "t_max"]),
    (["--model", "/nonexistent"], ["/nonexistent"]),
    (["--canvas-length", "0"], ["canvas-length"]),
    (["--max-new-tokens", "0"], ["max_new_tokens"]),
    (["--device", "nonsense"], ["device"]),
])
def test_generate_errors(capsys, extra, words):
    code, out, err = run(capsys, "generate", "Hello", *FAST, *extra)
    assert_one_line_error(code, err, *words)


def test_empty_prompt(capsys):
    code, out, err = run(capsys, "generate", "   ", *FAST)
    assert_one_line_error(code, err, "empty prompt")


def test_prompt_that_is_not_utf8(capsys, monkeypatch):
    code, out, err = run(capsys, "generate", "a\udcffb", *FAST)  # how Python passes the byte 0xff in argv
    assert_one_line_error(code, err, "the prompt is not valid UTF-8 text")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad"), errors="surrogateescape"))
    code, out, err = run(capsys, "generate", *FAST)
    assert_one_line_error(code, err, "the prompt is not valid UTF-8 text")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad"), encoding="utf-8"))  # strict
    code, out, err = run(capsys, "generate", *FAST)
    assert_one_line_error(code, err, "the prompt is not valid UTF-8 text")


def test_prompt_longer_than_context(capsys):
    code, out, err = run(capsys, "generate", "x" * 5000, *FAST)  # tiny: 4096 positions
    assert_one_line_error(code, err, "context")


def test_checkpoint_without_weights(capsys, tmp_path):
    from dgemma.config import preset

    preset("tiny").save(tmp_path)
    code, out, err = run(capsys, "generate", "Hello", *FAST, "--model", str(tmp_path))  # the last --model wins
    assert_one_line_error(code, err, "model.safetensors")


def test_info_errors(capsys):
    code, out, err = run(capsys, "info", "/nonexistent")
    assert_one_line_error(code, err, "/nonexistent")


def test_keyboard_interrupt_exits_130_quietly(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info_command, "cmd_info", interrupted)
    code, out, err = run(capsys, "info", "tiny")
    assert code == 130 and err == ""


def test_info_on_a_directory_that_is_not_a_checkpoint_names_it(capsys, tmp_path):
    code, out, err = run(capsys, "info", str(tmp_path))
    assert_one_line_error(code, err, f"{tmp_path}: no config.json there (not a checkpoint directory)")


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and out.startswith("dgemma ") and err == ""


@pytest.mark.parametrize("raised, words", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 2030043136 bytes."), ["out of memory: ", "can't allocate memory"]),
    (ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn"),
     ["this needs the uvicorn package: pip install 'dgemma[serve]'"]),
    (ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"),
     ["this needs the matplotlib package: pip install 'dgemma[train]'"]),
])
def test_out_of_memory_and_missing_extras_are_one_line_errors(capsys, monkeypatch, raised, words):
    def fails(args):
        raise raised

    monkeypatch.setattr(info_command, "cmd_info", fails)
    code, out, err = run(capsys, "info", "tiny")
    assert_one_line_error(code, err, *words)


def test_serve_without_the_serve_extra_says_which_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` fails as when it is not installed
    code, out, err = run(capsys, "serve", "--model", "tiny", "--port", "1")
    assert_one_line_error(code, err, "pip install 'dgemma[serve]'")


def test_python_dash_m_error_exit_status():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dgemma", "generate", "Hello", "--steps", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dgemma: error: max_denoising_steps must be an integer >= 1, got 0"]


def test_serve_on_a_taken_port_or_unknown_host_says_so_before_loading_the_model(capsys, monkeypatch):
    import socket

    from dgemma import api

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(api.DiffusionGemma, "from_pretrained", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(capsys, "serve", "--model", "tiny", "--device", "cpu", "--port", str(port))
    assert_one_line_error(code, err, f"cannot listen on 127.0.0.1:{port}:", "in use")
    code, out, err = run(capsys, "serve", "--model", "tiny", "--device", "cpu", "--host", "no-such-host.invalid")
    assert_one_line_error(code, err, "--host no-such-host.invalid:")


@pytest.mark.parametrize("argv, words", [
    (["generate", "Hello", "--device", "meta"], ["--device meta", "unsupported device type"]),
    (["generate", "Hello", "--seed", str(2**64)], ["--seed", "must be in [-2**63, 2**64)"]),
    (["train", "--data", "x.txt", "--out", "out", "--device", "nonsense"], ["invalid --device 'nonsense'"]),
    (["serve", "--device", "nonsense"], ["invalid --device 'nonsense'"]),
    (["serve", "--port", "70000"], ["--port", "must be in 1..65535, got 70000"]),
    (["eval", "--model", "tiny", "--device", "nonsense"], ["invalid --device 'nonsense'"]),
    (["eval", "--model", "tiny", "--sweep", "2,x"], ["--sweep", "invalid integer 'x'"]),
    (["eval", "--model", "tiny", "--steps", "0"], ["--steps", "must be >= 1, got 0"]),
    (["bench", "--device", "meta"], ["--device meta", "unsupported device type"]),
])
def test_bad_device_seed_port_and_eval_numbers_are_usage_errors(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)  # checked before any model loads or file is read
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(code, err, *words)
