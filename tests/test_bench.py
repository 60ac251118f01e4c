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
    assert [(r["mode"], r["batch"]) for r in result["runs"]] == [("traced", 1), ("eager", 1), ("traced", 2),
                                                                 ("eager", 2)]
    assert all(r["passes_per_canvas"] == 3 and r["new_tokens"] == 32 * r["batch"] for r in result["runs"])
    assert all((r["commit_first_pass_ms"] is None) == (r["mode"] == "static") for r in result["runs"])
    assert set(result["split_ms"]) == {"batch", "prompt_len", "variant", "attention_norms_residual", "dense_mlp", "experts",
                                       "self_conditioning", "lm_head_sampling"}
    assert json.loads((tmp_path / "bench.json").read_text())["runs"] == result["runs"]


def test_bench_times_the_ar_mode_for_the_same_number_of_tokens(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--modes", "eager", "--prompt-len", "8", "--passes",
                 "2", "--canvases", "2", "--repeats", "1", "--ar", "--out", str(tmp_path)]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    ar = [r for r in runs if r["system"] == "dgemma_ar"]
    assert len(ar) == 1 and ar[0]["new_tokens"] == 2 * 32 and ar[0]["tokens_per_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0


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
    (["--passes", "1"], "--passes needs values >= 2, got '1'"),
    (["--passes", "0,3"], "--passes needs values >= 2"),
    (["--modes", "eager,warp"], "unknown --modes ['warp']"),
    (["--device", "cpu", "--modes", "graph"], "need a CUDA device"),
    (["--device", "cpu", "--modes", "fp8"], "need a CUDA device"),
    # tiny: 4096 positions; this was killed for memory while building the prompt's attention mask
    (["--device", "cpu", "--prompt-len", "100000", "--canvases", "1", "--passes", "2", "--repeats", "1"],
     "--prompt-len 100000 + --canvases 1 x canvas 32 = 100032 tokens exceeds the model context of 4096"),
])
def test_bench_cli_errors(argv, message, capsys):
    assert main(["bench", "--preset", "tiny", *argv]) != 0
    assert message in capsys.readouterr().err


def test_pass_flops_count_every_matmul_of_a_decoder_pass():
    from dgemma.model.kv_cache import KVCache
    from dgemma.bench.floor import compute_floor, pass_flops

    dg = random_model(preset("tiny"), "cpu", torch.float32)
    m, t = dg.model, dg.model.text
    c, prompt = dg.config.canvas_length, 20
    cache = KVCache(t, 1, prompt + c, c, m.dtype)
    with torch.inference_mode():
        m.encode(torch.randint(3, 500, (1, prompt)), cache)
    canvas = torch.randint(0, t.vocab_size, (1, c))
    probs = torch.full((1, c, t.vocab_size), 1 / t.vocab_size)
    h, inter, heads = t.hidden_size, t.intermediate_size, t.num_attention_heads
    macs = t.vocab_size * h * 2 + 3 * h * inter  # LM head, soft embeddings, self-conditioning MLP
    for i, kind in enumerate(t.layer_types):
        d, kv = t.layer_head_dim(i), (t.num_key_value_heads if kind == "sliding_attention" else t.num_global_key_value_heads)
        seen = min(prompt, t.sliding_window - 1) if kind == "sliding_attention" else prompt
        proj = h * heads * d * 2 + h * kv * d * (2 if kind == "sliding_attention" else 1)  # q, o; k (and v)
        attn = 2 * heads * (seen + c) * d  # Q K^T and P V over [cache ; canvas]
        macs += proj + attn + 3 * h * inter + h * t.num_experts + t.top_k_experts * 3 * h * t.moe_intermediate_size
    assert pass_flops(m, lambda: m.denoise(canvas, cache, self_cond_probs=probs)) == 2 * c * macs
    floor = compute_floor(m, lambda: m.denoise(canvas, cache, self_cond_probs=probs), c)
    assert floor["compute_floor_ms"] == pytest.approx(floor["pass_gflop"] / floor["gemm_gflops"] * 1e3, rel=0.05)  # rounded
