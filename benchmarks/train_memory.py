#!/usr/bin/env python
"""Peak memory and time of one training step (loss + backward), with and without `--grad-checkpoint`.

Each setting runs in a fresh process (peak RSS is per process on the CPU; on CUDA, the allocator's peak) and
prints one JSON line. Random weights built on the device; `--lora R --dtype bfloat16` is a LoRA step on a bf16
base (adapters in fp32), as `dgemma train --lora R --dtype bfloat16` runs it, under bf16 autocast on CUDA:

    python benchmarks/train_memory.py --preset bench --seq-len 2048 --batch 4
    python benchmarks/train_memory.py --preset 26b-a4b --device cuda --dtype bfloat16 --lora 16 --seq-len 1024 --batch 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def step(preset_name: str, seq_len: int, batch: int, recompute: bool, device: str, dtype: str, lora: int) -> dict:
    import torch

    from dgemma.bench import random_model
    from dgemma.config import preset
    from dgemma.train.batches import pad_each
    from dgemma.train.data import Example
    from dgemma.train.objective import LossTotals, diffusion_gemma_loss, plan_canvases

    config = preset(preset_name)
    model = random_model(config, device, getattr(torch, dtype)).model.train()
    if lora:
        from dgemma.train.lora import add_lora

        add_lora(model, lora)
    else:
        model.requires_grad_(True)
    model.gradient_checkpointing = recompute
    vocab = config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = pad_each([Example([2] + torch.randint(3, vocab, (seq_len - 2,), generator=g).tolist() + [1], 1, str(i))
                     for i in range(batch)], seq_len, pad_id=0)
    plan = plan_canvases(rows, config.canvas_length, vocab, 0, g)
    rows, plan = rows.to(torch.device(device)), plan.to(torch.device(device))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):  # as training runs
        loss, _ = diffusion_gemma_loss(model, rows, plan, LossTotals.of(rows, plan), "unweighted")
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"preset": preset_name, "seq_len": seq_len, "batch": batch, "grad_checkpoint": recompute,
            "device": device, "dtype": dtype, "lora": lora, "peak_gib": round(peak, 3), "before_step_gib": round(before, 3),
            "step_s": round(time.perf_counter() - t, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the weights'")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="train rank-R adapters only (default: all)")
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # the child process's setting
    args = p.parse_args()
    if args.one:
        print(json.dumps(step(args.preset, args.seq_len, args.batch, args.one == "on", args.device, args.dtype,
                              args.lora)))
        return
    for setting in ("off", "on"):
        child = [sys.executable, __file__, "--preset", args.preset, "--seq-len", str(args.seq_len), "--batch",
                 str(args.batch), "--device", args.device, "--dtype", args.dtype, "--lora", str(args.lora),
                 "--one", setting]
        result = subprocess.run(child, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"train_memory: the {setting} run failed:\n{result.stderr.strip()}")
        print(result.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
