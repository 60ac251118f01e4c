"""`dgemma bench`: the time of one denoising pass and of whole canvases, against the hardware's floor.

    dgemma bench --preset 26b-a4b --device cuda --dtype bfloat16 --batch 1,4 --prompt-len 1024 --transformers
    dgemma bench --model models/dgemma-code-tiny --batch 1,8            # CPU, the shipped model

What it measures, per batch size and execution mode (`eager`: the plain PyTorch pass; `static`: fixed shapes
over every cache slot; `graph`: that pass captured as a CUDA graph; `fused`: graph with the elementwise pieces
(norms, RoPE, gated GELU) compiled into fused kernels; `compiled`: graph of the whole pass through
torch.compile; `triton`: graph with the Triton expert kernel; `fp8`: fused, with that kernel on FP8 expert
weights):

- `pass_ms`: one decoder pass over a canvas after a `--prompt-len` prompt (median of `--repeats`);
- `step_ms`: a whole denoising step as generation runs it (pass + temperature, sampling, acceptance,
  re-noising, early-stop test), from one-canvas generations of 1 and `--passes` steps;
- `commit_ms`: the encoder pass that commits a canvas to the cache; `commit_first_pass_ms` (eager): that commit
  folded into the next canvas's first decoder pass, as eager generation runs them (`commit_and_denoise`);
- `tokens_per_s`, `first_canvas_s`: `--canvases` canvases at exactly `--passes` passes each (random weights
  never stop early; `passes_per_canvas` shows it), prompt encoding included;
- the per-pass split (`--split`; eager, first batch size): attention (with norms and residuals), dense MLP,
  router + experts, self-conditioning, LM head + sampling, from events around the modules (on a GPU an eager
  pass is launch-bound, so launch gaps count in each part; `benchmarks/profile_pass.py` gives kernel times);
- `--batch`, `--prompt-len`, `--canvas` and `--passes` take comma-separated lists: every combination is run;
- peak memory: GPU memory allocated, or the process's peak RSS on the CPU;
- the floor (`dgemma.bench.floor`): the larger of the bytes of weights a pass must stream over the device's measured
  copy bandwidth (what bounds a GPU at small batch) and the pass's FLOPs over the device's measured matmul
  rate (what bounds a CPU); `pass_ms / floor_ms` says how close a pass gets, `floors` has both parts;
- `--transformers`: transformers' `DiffusionGemmaForBlockDiffusion` on the *same* weight tensors (no copy), its
  step time measured the same way;
- `--ar`: dgemma's autoregressive mode on the same weights (greedy, KV cache), for as many tokens.

A preset is built directly on the device with random weights (`normal(0, initializer_range)`, norms one): the
full 26B-A4B shape needs no checkpoint and no host memory. JSON goes to stdout (`--out DIR` also writes
`bench.json` and `bench.png`).
"""

from __future__ import annotations

from .floor import compute_floor, copy_bandwidth, pass_flops, weight_bytes
from .measure import MODES, filled_cache, prompt_ids, run, set_experts
from .models import random_model, transformers_sharing

__all__ = ["MODES", "compute_floor", "copy_bandwidth", "filled_cache",
           "pass_flops", "prompt_ids", "random_model", "run", "set_experts", "transformers_sharing", "weight_bytes"]
