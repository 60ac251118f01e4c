"""`dgemma bench`: time denoising passes and canvases against the hardware floor (`dgemma.bench`). JSON on
stdout; --out also writes bench.json and the plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..bench.measure import MODES, log, run
from ..bench.plot import plot
from ..config import PRESETS, WEIGHT_DTYPES
from .common import CLIError, int_at_least_1, pick_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time denoising passes and canvases against the hardware floor",
                       description="Time decoder passes, denoising steps and whole canvases of dgemma (and, when "
                                   "asked, of transformers and of the same weights' AR mode) over sweeps of batch "
                                   "size, prompt length, canvas length and passes, against the hardware floor. "
                                   "Prints JSON on stdout; --out also writes plots.")
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
    p.add_argument("--canvases", type=int_at_least_1, default=2, help="canvases per generation (default 2)")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)} "
                                                 "(default: eager,graph on CUDA, traced,eager on the CPU)")
    p.add_argument("--split", action="store_true", help="also the per-part split of an eager pass")
    p.add_argument("--transformers", action="store_true", help="also transformers on the same weights")
    p.add_argument("--ar", action="store_true", help="also dgemma's autoregressive mode on the same weights, for the "
                                                      "same number of tokens")
    p.add_argument("--repeats", type=int_at_least_1, default=6)
    p.add_argument("--threads", type=int_at_least_1)
    p.add_argument("--out", metavar="DIR", help="write bench.json and bench.png here")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
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
