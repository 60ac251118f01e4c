"""The plot of `dgemma bench --out`: step time against each run's floor, and tokens/s."""

from __future__ import annotations

from pathlib import Path


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
