"""`dgemma bench` on the command line: arguments, the JSON on stdout, the plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config import PRESETS, WEIGHT_DTYPES
from .measure import MODES, log, run


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["runs"] if "step_ms" in r]
    all_rows = [r for r in result["runs"] if "tokens_per_s" in r]  # with the AR rows
    varied = [k for k in ("prompt_len", "canvas_length", "passes") if len({r.get(k) for r in rows}) > 1]
    short = {"prompt_len": "p", "canvas_length": "c", "passes": "s"}

    def label(r):
        name = r["mode"] if r["system"] == "dgemma" else r["system"]
        return " ".join([f"{name}\nb{r['batch']}"] + [f"{short[k]}{r[k]}" for k in varied if k in r])

    fig, axes = plt.subplots(1, 2, figsize=(max(11, 0.5 * len(all_rows) + 4), 4.5))
    bars = axes[0].bar([label(r) for r in rows], [r["step_ms"] for r in rows], color="#4c72b0")
    axes[0].bar_label(bars, fmt="%.1f", fontsize=7)
    floors = [r.get("floor_ms") for r in rows]
    if any(floors):  # each bar's own floor (batch, prompt and canvas change the compute floor)
        xs = range(len(rows))
        axes[0].scatter(xs, [f if f else float("nan") for f in floors], color="red", marker="_", s=400, zorder=3,
                        label="pass floor: max(weight bytes / bandwidth, FLOPs / GEMM rate)")
        axes[0].legend(fontsize=8)
    axes[0].set_ylabel("ms per denoising step (pass + sampling)")
    bars = axes[1].bar([label(r) for r in all_rows], [r["tokens_per_s"] for r in all_rows], color="#55a868")
    axes[1].bar_label(bars, fmt="%.0f", fontsize=7)
    axes[1].set_ylabel("tokens/s (fixed passes; AR: 1 token/pass)")
    for ax, n in zip(axes, (len(rows), len(all_rows))):
        ax.tick_params(axis="x", labelsize=7, rotation=90 if n > 8 else 0)
    m = result["machine"]
    legend = ", ".join(f"{v}=" + k for k, v in short.items() if k in varied)
    fig.suptitle(f"{result['model']['source']}; {m.get('gpu') or m.get('cpu')}" + (f" ({legend})" if legend else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time denoising passes and canvases against the hardware floor",
                       description="Time decoder passes, denoising steps and whole canvases of dgemma (and, when "
                                   "asked, of transformers and of the same weights' AR mode) over sweeps of batch "
                                   "size, prompt length, canvas length and passes, against the hardware floor. "
                                   "Prints JSON on stdout; --out also writes plots.")
    from ..cli import int_at_least_1 as positive_int
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="a checkpoint directory")
    src.add_argument("--preset", default="tiny", choices=PRESETS, help="random weights of this shape (default tiny)")
    p.add_argument("--random-weights", action="store_true", help="with --preset (the default for a preset)")
    p.add_argument("--canvas", help="comma-separated canvas lengths (default: the model's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=WEIGHT_DTYPES,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--prompt-len", default="1024", help="comma-separated prompt lengths (default 1024)")
    p.add_argument("--passes", default="16", help="comma-separated denoising passes per canvas, each >= 2 "
                                                  "(default 16)")
    p.add_argument("--canvases", type=positive_int, default=2, help="canvases per generation (default 2)")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)} "
                                                 "(default: eager,graph on CUDA, traced,eager on the CPU)")
    p.add_argument("--split", action="store_true", help="also the per-part split of an eager pass")
    p.add_argument("--transformers", action="store_true", help="also transformers on the same weights")
    p.add_argument("--ar", action="store_true", help="also dgemma's autoregressive mode on the same weights, for the "
                                                      "same number of tokens")
    p.add_argument("--repeats", type=positive_int, default=6)
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--out", metavar="DIR", help="write bench.json and bench.png here")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..cli import CLIError, pick_device

    for name in ("batch", "prompt_len", "passes", "canvas"):
        flag, text = "--" + name.replace("_", "-"), getattr(args, name)
        if text is None:
            continue
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from None
        least = 2 if name == "passes" else 1  # the step time is a difference of 1 and --passes passes
        if not values or min(values) < least:
            raise CLIError(f"{flag} needs values >= {least}, got {text!r}")
        setattr(args, name, values)
    cuda = pick_device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.modes = (args.modes or ("eager,graph" if cuda else "traced,eager")).split(",")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise CLIError(f"unknown --modes {bad}; choose from {', '.join(MODES)}")
    if not cuda and set(args.modes) - {"traced", "eager", "static"}:
        raise CLIError("--modes other than traced, eager and static need a CUDA device")
    if cuda and "traced" in args.modes:
        raise CLIError("--modes traced runs on the CPU only (CUDA passes run as CUDA graphs: --modes graph)")
    if args.model:
        args.preset = None
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        try:
            plot(result, Path(args.out) / "bench.png")
        except ImportError:
            log("matplotlib is not installed: no plot")
    return 0 if not result["errors"] else 1
