"""What a run shows and leaves behind: a progress bar (tqdm when installed, else a plain line every few
steps) with loss, tokens/s and ETA; `metrics.jsonl` (one JSON object per step or evaluation); and a loss-curve
PNG at the end (when matplotlib is installed). Only the main process reports.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Reporter:
    def __init__(self, out: Path, start_step: int, total_steps: int, log_every: int = 10):
        self.path = out / METRICS_FILE
        self.start, self.total, self.log_every = start_step, total_steps, log_every
        self.t0 = time.perf_counter()
        truncate_metrics(self.path, start_step)  # a resumed run replaces what followed its checkpoint
        tqdm = _tqdm()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) if tqdm else None

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, record: dict[str, Any]) -> None:
        """Record one optimizer step: needs `step`, `loss`, `tokens_per_s`."""
        elapsed = time.perf_counter() - self.t0
        record = {**record, "elapsed_s": round(elapsed, 3)}
        self._write(record)
        step = record["step"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)
        elif step % self.log_every == 0 or step == self.total:
            eta = elapsed / (step - self.start) * (self.total - step)
            parts = ", ".join(f"{name} {record[key]:.4f}" for key, name in (("diffusion_loss", "diffusion"),
                                                                            ("ar_loss", "ar")) if key in record)
            print(f"step {step}/{self.total} loss {record['loss']:.4f} ({parts}) lr {record['lr']:.2e} "
                  f"{record['tokens_per_s']:.0f} tok/s eta {_duration(eta)}", file=sys.stderr, flush=True)

    def eval(self, record: dict[str, Any]) -> None:
        self._write(record)
        line = f"eval step {record['step']}: loss {record['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> Path | None:
        """Close the bar and draw the loss curve; returns the PNG path, or None without matplotlib."""
        if self.bar is not None:
            self.bar.close()
        return plot_loss_curve(self.path, self.path.parent / CURVE_FILE)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a last line cut short (the process killed while writing it) is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").split("\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                log.warning("%s: dropped its last line, cut short (%s)", path, e.msg)
                break
            raise ConfigError(f"{path}:{number}: not a metrics record ({e.msg}); move the file away to go on") \
                from None
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (logged after the checkpoint a run resumes from)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_loss_curve(metrics: Path, png: Path) -> Path | None:
    """Training loss (total, diffusion, AR) and held-out loss against the step; a part a run did not record
    (the diffusion loss of an AR-only run) is left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("loss", "train loss"), ("diffusion_loss", "diffusion"), ("ar_loss", "AR")):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            ax.plot(*zip(*points), label=label, linewidth=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
