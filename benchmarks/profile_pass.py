#!/usr/bin/env python
"""Where a denoising pass spends its GPU time: torch.profiler over a few static (un-graphed) passes of the
full-size model with random bf16 weights, the kernels sorted by CUDA time.

    python benchmarks/profile_pass.py --batch 1 --experts triton --rows 25
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.bench import filled_cache, prompt_ids, random_model, set_experts
from dgemma.config import preset
from dgemma.engine.static import StaticDenoiser


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--batch", default="1")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--experts", default="eager", choices=["eager", "triton"])
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    dg = random_model(preset(args.preset), "cuda", torch.bfloat16)
    set_experts(dg.model, args.experts)
    c, vocab = dg.config.canvas_length, dg.model.text.vocab_size
    for b in [int(x) for x in args.batch.split(",")]:
        cache = filled_cache(dg, prompt_ids(b, args.prompt_len, vocab), c)
        den = StaticDenoiser(dg.model, cache, graph=False)
        den.prepare()
        canvas = torch.randint(0, vocab, (b, c), device="cuda")
        sc = torch.randn(b, c, vocab, device="cuda").softmax(-1)  # the last pass's probabilities
        with torch.inference_mode():
            for _ in range(2):
                den(canvas, sc)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    den(canvas, sc)
                torch.cuda.synchronize()
        print(f"== batch {b}, experts {args.experts}: 3 passes ==")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
