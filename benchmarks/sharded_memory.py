#!/usr/bin/env python
"""Memory per process of sharded training (`dgemma train --fsdp`) at 1 and 2 processes, against one unsharded
process, and against what `dgemma train --plan` predicts.

Each setting runs one training step in its own processes (torchrun, gloo on the CPU) and each process prints
what it holds: the bytes of its parameters, gradients and AdamW state (its shards, when sharded: the local
tensors), the bytes autograd saved for the backward pass (dedicated storages other than weights), and its peak
RSS. One JSON object on stdout:

    python benchmarks/sharded_memory.py                       # tiny and bench, full training and LoRA
    python benchmarks/sharded_memory.py --presets bench --seq-len 512 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = (("unsharded", 1), ("fsdp", 1), ("fsdp", 2))


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def one(preset: str, fsdp: bool, lora: int, seq_len: int, batch_size: int) -> dict:
    """One process's figures after one step (run under torchrun when sharded)."""
    import torch

    from dgemma.train import loop
    from dgemma.train.batches import pad_each
    from dgemma.train.config import TrainConfig
    from dgemma.train.data import Example
    from dgemma.train.distributed import Distributed
    from dgemma.train.objective import LossTotals
    from dgemma.train.optim import build_optimizer
    from dgemma.train.plan import Setup, activation_bytes, memory

    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp())
    cfg = TrainConfig(data=[], out=out, model=preset, batch_size=batch_size, seq_len=seq_len, fsdp=fsdp, lora=lora)
    dist = Distributed.start(torch.device("cpu"), sharded=fsdp)
    cfg.validate(dist.world_size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if fsdp:
        model, step = loop._setup_sharded(cfg, out, dist)
    else:
        model = loop._setup_model(cfg, None, out, dist)
        step = loop._training_step(model, cfg)
    params = [p for p in step.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.lr, cfg.betas, cfg.weight_decay)
    config = model.config
    vocab = config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = pad_each([Example([2] + torch.randint(3, vocab, (seq_len - 2,), generator=g).tolist() + [1], 1, str(i))
                      for i in range(batch_size)], seq_len, pad_id=0)
    plan = loop.plan_canvases(batch, config.canvas_length, vocab, 0, g, self_cond_prob=1.0)
    mine = dist.my_rows(batch_size)

    saved: dict[int, int] = {}

    def storage(p) -> int | None:
        try:
            return p.untyped_storage().data_ptr()
        except RuntimeError:  # a sharded weight's gathered copy, freed
            return None

    def pack(t):
        weights = {storage(p) for p in step.parameters()}
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = step(batch.rows(mine), plan.rows(mine), LossTotals.of(batch, plan), bool(plan.self_cond.any()))
    activations = sum(saved.values())
    loss.backward()
    dist.sum_gradients(params)
    grads = _local_bytes(p.grad for p in params)
    dist.clip_gradients(params, cfg.clip)
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    figures = {"params_bytes": _local_bytes(step.parameters()), "grads_bytes": grads,
               "optimizer_bytes": _local_bytes(state), "saved_activation_bytes": activations}
    predicted = memory(config, Setup(dist.world_size, fsdp, False, lora, "float32", "float32", batch_size, seq_len))
    rows = len(mine)
    result = {"preset": preset, "setting": "fsdp" if fsdp else "unsharded", "lora": lora,
              "world_size": dist.world_size, "rank": dist.rank, **figures,
              "params_plus_optimizer_bytes": figures["params_bytes"] + figures["optimizer_bytes"],
              "plan": {"params_bytes": predicted.parameters, "grads_bytes": predicted.gradients,
                       "optimizer_bytes": predicted.optimizer,
                       "saved_activation_bytes": activation_bytes(config, rows, seq_len, lora=lora).saved},
              "rss_before_model_gib": round(rss_before, 3),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    dist.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "bench"])
    p.add_argument("--seq-len", type=int, help="default: 64 for tiny, 512 otherwise")
    p.add_argument("--batch", type=int, default=2, help="global rows (default 2: one per process at 2)")
    p.add_argument("--lora", type=int, default=8, metavar="R", help="also LoRA rank R (0: full training only)")
    p.add_argument("--one", nargs=4, metavar=("PRESET", "SETTING", "LORA", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a process of one setting: its figures go to DIR/RANK.json
        preset, setting, lora, directory = args.one
        result = one(preset, setting == "fsdp", int(lora), args.seq_len, args.batch)
        Path(directory, f"{result['rank']}.json").write_text(json.dumps(result))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for preset in args.presets:
        seq_len = args.seq_len or (64 if preset == "tiny" else 512)
        for lora in sorted({0, args.lora}):
            for setting, n in SETTINGS:
                directory = tempfile.mkdtemp()
                child = [__file__, "--one", preset, setting, str(lora), directory, "--seq-len", str(seq_len),
                         "--batch", str(args.batch)]
                launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(n)] if setting == "fsdp" else [sys.executable])
                done = subprocess.run(launcher + child, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.exit(f"sharded_memory: {preset} {setting} x{n} failed:\n{done.stderr[-3000:]}")
                results += [json.loads(Path(directory, f"{rank}.json").read_text()) for rank in range(n)]
    summary = []
    for preset in args.presets:
        for lora in sorted({0, args.lora}):
            def per_rank(setting, n):
                return [r["params_plus_optimizer_bytes"] for r in results if (r["preset"], r["setting"],
                        r["world_size"], r["lora"]) == (preset, setting, n, lora)]
            one_process, two = per_rank("fsdp", 1)[0], per_rank("fsdp", 2)
            summary.append({"preset": preset, "lora": lora, "params_plus_optimizer_1_process": one_process,
                            "params_plus_optimizer_2_processes": two,
                            "ratio_2_to_1": [round(b / one_process, 4) for b in two]})
    import torch

    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                                 f"{torch.__version__}", "results": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
