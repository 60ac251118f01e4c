"""The evaluation of `dgemma eval`: held-out loss and line infilling (standard library, HumanEval), diffusion
against the AR baseline. `run` gives the report as one dict; `markdown` and `plot` render it.
"""

from __future__ import annotations

import difflib
import sys
import time
from pathlib import Path
from statistics import mean

from ..api import load_text_model
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
    model = load_text_model(model_dir, device)
    ar_model = load_text_model(ar_model_dir, device) if ar_model_dir else model
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
