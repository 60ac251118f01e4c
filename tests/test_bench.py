"""`dgemma bench` on the CPU: it runs, reports what it says, and transformers can share dgemma's tensors."""

from __future__ import annotations

import json

import pytest
import torch

from dgemma.bench import random_model, transformers_sharing, weight_bytes
from dgemma.cli import main
from dgemma.config import preset


def test_random_model_on_device_has_the_preset_shape_and_finite_outputs():
    dg = random_model(preset("tiny"), "cpu", torch.float32)
    assert sum(weight_bytes(dg.model).values()) == 4 * sum(p.numel() for p in dg.model.parameters())
    out = dg.generate(input_ids=torch.tensor([[2, 7, 9]]), max_new_tokens=32, seed=0)
    assert out.sequences.shape == (1, 3 + 32)


def test_transformers_on_shared_tensors_generates_the_same_tokens():
    pytest.importorskip("transformers")
    dg = random_model(preset("tiny"), "cpu", torch.float32, seed=1)
    hf = transformers_sharing(dg)
    assert hf.model.decoder.embed_tokens.weight.data_ptr() == dg.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[2, 11, 12, 13, 14]])
    torch.manual_seed(0)
    want = hf.generate(input_ids=ids, max_new_tokens=64, max_denoising_steps=8, eos_token_id=[], pad_token_id=0)
    torch.manual_seed(0)
    got = dg.generate(input_ids=ids, max_new_tokens=64, max_denoising_steps=8, eos_token_id=[])
    assert torch.equal(got.sequences, want.sequences)


def test_bench_cli_reports_every_mode_with_fixed_passes(tmp_path, capsys):
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--batch", "1,2", "--prompt-len", "20", "--passes", "3",
                 "--canvases", "1", "--repeats", "2", "--split", "--out", str(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["errors"] == []
    assert [(r["mode"], r["batch"]) for r in result["runs"]] == [("eager", 1), ("static", 1), ("eager", 2),
                                                                 ("static", 2)]
    assert all(r["passes_per_canvas"] == 3 and r["new_tokens"] == 32 * r["batch"] for r in result["runs"])
    assert set(result["split_ms"]) == {"batch", "prompt_len", "variant", "attention_norms_residual", "dense_mlp", "experts",
                                       "self_conditioning", "lm_head_sampling"}
    assert json.loads((tmp_path / "bench.json").read_text())["runs"] == result["runs"]


def test_bench_sweeps_prompt_canvas_and_passes(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--modes", "eager", "--prompt-len", "8,20",
                 "--canvas", "16,32", "--passes", "2,3", "--canvases", "1", "--repeats", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["canvas_length"], r["prompt_len"], r["passes"]) for r in rows] == [
        (c, p, s) for c in (16, 32) for p in (8, 20) for s in (2, 3)]
    assert all(r["passes_per_canvas"] == r["passes"] and r["new_tokens"] == r["canvas_length"] for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "1,x"], "--batch must be comma-separated integers"),
    (["--prompt-len", "0"], "--prompt-len needs values >= 1"),
    (["--passes", "1"], "--passes must be >= 2"),
    (["--modes", "eager,warp"], "unknown --modes ['warp']"),
    (["--device", "cpu", "--modes", "graph"], "need a CUDA device"),
    (["--device", "cpu", "--modes", "fp8"], "need a CUDA device"),
])
def test_bench_cli_errors(argv, message, capsys):
    assert main(["bench", "--preset", "tiny", *argv]) != 0
    assert message in capsys.readouterr().err
