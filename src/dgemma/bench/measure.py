"""What `dgemma bench` measures: pass, step, commit and generation times per batch, prompt, canvas and mode,
transformers on the same tensors, the per-part split, each against the pass's floor."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ..api import DiffusionGemma
from ..config import ConfigError, GenerationConfig, preset
from ..engine.static import StaticDenoiser, StaticPool
from ..model.kv_cache import KVCache
from ..model.model import DiffusionGemmaModel
from ..sampling import CanvasRNG
from ..sampling.step import CanvasState, denoise_update
from .floor import compute_floor, copy_bandwidth, median_ms, sync, weight_bytes
from .models import random_model, transformers_sharing

MODES = ("traced", "eager", "static", "graph", "fused", "compiled", "triton", "fp8")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free(device: torch.device) -> None:
    """Release what dropped objects held (a captured graph's private pool goes only when the graph is freed)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fixed_passes(dg: DiffusionGemma, passes: int, canvases: int) -> GenerationConfig:
    """Exactly `passes` passes per canvas: no EOS, and a confidence threshold no random model gets under."""
    return dg.generation_config.updated(max_denoising_steps=passes, max_new_tokens=canvases * dg.config.canvas_length,
                                        eos_token_id=[], confidence_threshold=1e-30)


def prompt_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1234)
    return torch.randint(3, min(vocab, 255_000), (batch, length), generator=g)


def filled_cache(dg: DiffusionGemma, ids: torch.Tensor, extra: int) -> KVCache:
    b, n = ids.shape
    c = dg.config.canvas_length
    cache = KVCache(dg.model.text, b, n + extra, c, dg.model.dtype, dg.device)
    with torch.inference_mode():
        dg.model.encode(ids.to(dg.device), cache)
    return cache


def pass_split(dg: DiffusionGemma, cache: KVCache, canvas: torch.Tensor, repeats: int) -> dict[str, float]:
    """ms per eager pass spent in each part, from CUDA events (CPU: perf_counter) around the modules."""
    model, device = dg.model, dg.device
    cuda = device.type == "cuda"
    marks: dict[str, list] = {}

    def stamp():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def hooks(module, key):
        def pre(*_):
            marks.setdefault(key, []).append([stamp(), None])

        def post(*_):
            marks[key][-1][1] = stamp()
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    handles = []
    for layer in model.layers:
        handles += hooks(layer, "layers") + hooks(layer.mlp, "dense_mlp") + hooks(layer.router, "experts") + \
            hooks(layer.experts, "experts")
    handles += hooks(model.self_conditioning, "self_conditioning")
    gen = fixed_passes(dg, 2, 1)
    sc = torch.randn(canvas.shape[0], canvas.shape[1], model.text.vocab_size, device=device).softmax(-1)
    totals: dict[str, list[float]] = {}
    try:
        with torch.inference_mode(), model.vocab_session():
            for r in range(repeats + 1):
                marks.clear()
                t_soft = [stamp()]
                soft = model.embed_probs(sc)
                t_soft.append(stamp())
                x = model.forward(canvas, cache, None, True, soft)
                t_head = [stamp()]
                logits = model.logits(x)
                state = CanvasState.start(canvas, gen)
                denoise_update(state, logits, 2, gen, CanvasRNG())
                t_head.append(stamp())
                sync(device)
                if r == 0:
                    continue

                def ms(a, b):
                    return a.elapsed_time(b) if cuda else (b - a) * 1e3
                part = {k: sum(ms(a, b) for a, b in v) for k, v in marks.items()}
                part["attention_norms_residual"] = part.pop("layers") - part["dense_mlp"] - part["experts"]
                part["self_conditioning"] += ms(*t_soft)
                part["lm_head_sampling"] = ms(*t_head)
                for k, v in part.items():
                    totals.setdefault(k, []).append(v)
    finally:
        for h in handles:
            h.remove()
    return {k: round(statistics.median(v), 3) for k, v in totals.items()}


def time_generate(dg: DiffusionGemma, ids: torch.Tensor, gen: GenerationConfig, static: bool, repeats: int,
                  warmup: int = 1) -> dict[str, Any]:
    device = dg.device
    runs = []
    for i in range(warmup + repeats):
        torch.manual_seed(0)
        sync(device)
        t0 = time.perf_counter()
        out = dg.generate(input_ids=ids, generation_config=gen, static_cache=static, return_dict_in_generate=True)
        sync(device)
        if i >= warmup:
            runs.append((time.perf_counter() - t0, out))
    wall = statistics.median(w for w, _ in runs)
    out = runs[-1][1]
    s = out.stats
    new = sum(s.new_tokens)
    return {"tokens_per_s": new / wall, "wall_s": wall, "new_tokens": new,
            "first_canvas_s": statistics.median(o.stats.first_canvas_s for _, o in runs),
            "passes_per_canvas": statistics.mean(p for row in s.passes_per_canvas for p in row),
            "tokens_per_forward": statistics.mean(s.tokens_per_forward)}


def step_ms(run_one_canvas, passes: int, device: torch.device, repeats: int) -> float:
    """ms per denoising step: (one canvas at `passes` steps - one canvas at 1 step) / (passes - 1)."""
    t_many = median_ms(lambda: run_one_canvas(passes), device, repeats, warmup=1)
    t_one = median_ms(lambda: run_one_canvas(1), device, repeats, warmup=1)
    return (t_many - t_one) / (passes - 1)


# -- the run -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        dg = DiffusionGemma.from_pretrained(args.model, dtype=dtype, device=device)
        source = args.model
    else:
        cfg = preset(args.preset)
        log(f"building {args.preset} with random weights on {device} ({args.dtype})")
        dg = random_model(cfg, str(device), dtype)
        source = f"preset {args.preset}, random weights"
    model, vocab = dg.model, dg.model.text.vocab_size
    context = model.text.max_position_embeddings
    widest = max(args.canvas or [dg.config.canvas_length])
    longest = max(args.prompt_len) + args.canvases * widest
    if longest > context:
        raise ConfigError(f"--prompt-len {max(args.prompt_len)} + --canvases {args.canvases} x canvas {widest} = "
                          f"{longest} tokens exceeds the model context of {context}")
    result: dict[str, Any] = {
        "machine": machine(device), "model": {"source": source, "parameters": sum(p.numel() for p in model.parameters()),
                                               "canvas_length": dg.config.canvas_length, "vocab_size": vocab,
                                               "dtype": args.dtype},
        "settings": {k: getattr(args, k) for k in ("prompt_len", "canvas", "passes", "canvases", "repeats", "batch",
                                                   "modes")},
        "runs": [], "errors": [],
    }
    bw = copy_bandwidth(device)
    wb = weight_bytes(model)
    result["weights_bytes"] = wb
    result["copy_bandwidth_GBps"] = None if bw is None else round(bw / 1e9, 1)
    floor = None if bw is None else sum(wb.values()) / bw * 1e3
    result["bandwidth_floor_ms"] = None if floor is None else round(floor, 3)
    log(f"weights {sum(wb.values()) / 1e9:.2f} GB, copy bandwidth {result['copy_bandwidth_GBps']} GB/s, "
        f"bandwidth floor {result['bandwidth_floor_ms']} ms/pass")
    emit(args, result)

    modes = [m for m in args.modes if m != "fp8"]
    best = next((m for m in ("fused", "triton") if m in modes), "eager")  # for the split

    def sweep(modes_now: list[str], floor_now, with_extras: bool) -> None:
        for canvas_length in args.canvas or [dg.config.canvas_length]:
            dg.config.canvas_length = canvas_length
            for prompt_len in args.prompt_len:
                for b in args.batch:
                    ids = prompt_ids(b, prompt_len, vocab)
                    canvas = torch.randint(0, vocab, (b, canvas_length), device=device)
                    tag = f"b{b} prompt {prompt_len} canvas {canvas_length}"
                    set_experts(model, "eager")
                    floors = pass_floor(dg, ids, canvas, floor_now)
                    result.setdefault("floors", []).append({"batch": b, "prompt_len": prompt_len,
                                                            "canvas_length": canvas_length, **floors})
                    for mode in modes_now:
                        def one(mode=mode):
                            set_experts(model, mode)
                            result["runs"].extend(measure(dg, ids, canvas, mode, args, floors["floor_ms"]))
                        guarded(result, f"{mode} {tag}", one)
                        emit(args, result)
                    if not with_extras:
                        continue
                    if args.split and "split_ms" not in result:
                        def split():
                            set_experts(model, best)
                            cache = filled_cache(dg, ids, canvas_length)
                            result["split_ms"] = {"batch": b, "prompt_len": prompt_len, "variant": best,
                                                  **pass_split(dg, cache, canvas, args.repeats)}
                        guarded(result, "split", split)
                        emit(args, result)
                    if args.transformers:
                        guarded(result, f"transformers {tag}", lambda: result["runs"].extend(
                            measure_transformers(dg, ids, args, floors["floor_ms"])))
                        emit(args, result)
                    if args.ar:
                        guarded(result, f"ar {tag}", lambda: result["runs"].append(measure_ar(dg, ids, args)))
                        emit(args, result)

    sweep(modes, floor, True)
    if "fp8" in args.modes:
        def fp8():
            c = dg.config.canvas_length = (args.canvas or [dg.config.canvas_length])[0]
            cache = filled_cache(dg, prompt_ids(1, args.prompt_len[0], vocab), c)
            ref_canvas = torch.randint(0, vocab, (1, c), device=device)
            set_experts(model, "eager")
            experts = model.layers[0].experts
            x = torch.randn(c, model.text.hidden_size, device=device, dtype=model.dtype)
            weights, ids = model.layers[0].router(x)
            with torch.inference_mode():
                before, expert_before = model.denoise(ref_canvas, cache), experts(x, weights, ids)
                set_experts(model, "fp8")
                after, expert_after = model.denoise(ref_canvas, cache), experts(x, weights, ids)
            # one layer's experts: the quantisation error itself; the logits of a random-weight model amplify any
            # perturbation over 30 layers, so their error says little about a trained model
            result["fp8_expert_rel_error"] = float((expert_after - expert_before).float().norm()
                                                   / expert_before.float().norm())
            result["fp8_logits_rel_error_random_weights"] = float((after - before).norm() / before.norm())
            result["weights_bytes_fp8"] = weight_bytes(model)
            fp8_floor = None if bw is None else sum(result["weights_bytes_fp8"].values()) / bw * 1e3
            result["bandwidth_floor_ms_fp8"] = fp8_floor
            cache = None
            free(device)
            sweep(["fp8"], fp8_floor, False)
        guarded(result, "fp8", fp8)
    if device.type == "cuda":
        result["peak_memory_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    else:
        import resource
        result["peak_rss_GB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)  # KiB on Linux
    emit(args, result)
    return result


def pass_floor(dg: DiffusionGemma, ids: torch.Tensor, canvas: torch.Tensor, bandwidth_floor: float | None) -> dict:
    """The floor of a decoder pass at this batch, prompt and canvas: the larger of the bandwidth floor and the
    compute floor (`dgemma.bench.floor`)."""
    model = dg.model
    cache = filled_cache(dg, ids, canvas.shape[1])
    probs = torch.full((*canvas.shape, model.text.vocab_size), 1 / model.text.vocab_size, device=dg.device)
    floors = compute_floor(model, lambda: model.denoise(canvas, cache, self_cond_probs=probs), canvas.numel())
    floors["bandwidth_floor_ms"] = None if bandwidth_floor is None else round(bandwidth_floor, 3)
    floors["floor_ms"] = round(max(bandwidth_floor or 0.0, floors["compute_floor_ms"]), 3)
    log(f"pass floor {floors}")
    return floors


def set_experts(model: DiffusionGemmaModel, mode: str) -> None:
    """`triton`: the Triton expert kernel (bf16); `fp8`: the same with FP8 weights (for good: frees the bf16
    experts); otherwise torch's grouped_mm."""
    from ..model.layers import compile_elementwise
    from ..model.moe_kernel import use_triton_experts

    compile_elementwise(mode in ("fused", "fp8"))
    current = model.layers[0].experts.kernel
    if current is not None and current.fp8:
        return
    if mode in ("triton", "fp8"):
        if current is None or mode == "fp8":
            use_triton_experts(model, fp8=mode == "fp8")
    else:
        for layer in model.layers:
            layer.experts.kernel = None


def measure(dg: DiffusionGemma, ids: torch.Tensor, canvas: torch.Tensor, mode: str, args, floor) -> list[dict]:
    """One row per `--passes` value: pass, commit and step times, and generation at that many passes."""
    device, model, c = dg.device, dg.model, dg.config.canvas_length
    b = ids.shape[0]
    static = mode not in ("eager", "traced")
    graph = mode not in ("eager", "traced", "static")
    # `traced` (the CPU default): passes replayed from TorchScript traces, recorded on first use here (in the
    # warm-up calls); `eager`: every pass through the Python layer code
    tracing = model.trace_passes, model._passes.trace_after
    model.trace_passes, model._passes.trace_after = mode == "traced", 1
    log(f"{mode} batch {b} prompt {ids.shape[1]} canvas {c}")
    cache = filled_cache(dg, ids, c)
    sc = torch.randn(b, c, model.text.vocab_size, device=device).softmax(-1)  # last pass's probabilities
    den = None
    with torch.inference_mode(), model.vocab_session():  # as generation runs its passes
        if static:
            den = StaticDenoiser(model, cache, graph=graph, compile=mode == "compiled")
            den.prepare()
            pass_ms = median_ms(lambda: den(canvas, sc), device, args.repeats)
        else:
            pass_ms = median_ms(lambda: model.denoise(canvas, cache, self_cond_probs=sc), device, args.repeats)
        lengths = cache.lengths.clone()
        slots = {k: v.clone() for k, v in cache.slot_pos.items()}

        def restore():
            cache.lengths.copy_(lengths)
            for k, v in slots.items():
                cache.slot_pos[k].copy_(v)

        def commit():
            model.encode(canvas, cache)
            restore()

        def commit_first_pass():  # what the eager loop runs instead of a commit and the next canvas's first pass
            model.commit_and_denoise(canvas, canvas, cache)
            restore()
        commit_ms = median_ms(commit, device, args.repeats)
        fused_ms = None if static else median_ms(commit_first_pass, device, args.repeats)
    cache = den = None  # free the cache (and graph) before generation allocates its own
    free(device)

    dg._static = StaticPool(graph=graph, compile=mode == "compiled")  # generation: the same pass as timed above

    def one_canvas(steps: int):
        dg.generate(input_ids=ids, generation_config=fixed_passes(dg, steps, 1), static_cache=static)

    rows = []
    for passes in args.passes:
        step = step_ms(one_canvas, passes, device, max(2, args.repeats // 3))
        gen = time_generate(dg, ids, fixed_passes(dg, passes, args.canvases), static, max(1, args.repeats // 3))
        row = {"system": "dgemma", "mode": mode, "batch": b, "prompt_len": ids.shape[1], "canvas_length": c,
               "passes": passes, "pass_ms": round(pass_ms, 3), "step_ms": round(step, 3),
               "commit_ms": round(commit_ms, 3),
               "commit_first_pass_ms": None if fused_ms is None else round(fused_ms, 3),
               **{k: round(v, 4) for k, v in gen.items()}}
        if floor:
            row["floor_ms"], row["pass_over_floor"] = round(floor, 3), round(pass_ms / floor, 3)
        rows.append(row)
    dg._static = StaticPool()  # drop the captured graph and its cache
    model.trace_passes, model._passes.trace_after = tracing
    free(device)
    return rows


def measure_transformers(dg: DiffusionGemma, ids: torch.Tensor, args, floor) -> list[dict]:
    import transformers

    device, c = dg.device, dg.config.canvas_length
    b = ids.shape[0]
    log(f"transformers batch {b}")
    hf = transformers_sharing(dg)
    dev_ids = ids.to(device)

    def canvases(n: int, steps: int):
        with torch.inference_mode():
            hf.generate(input_ids=dev_ids, max_new_tokens=n * c, max_denoising_steps=steps, eos_token_id=[],
                        pad_token_id=0)

    rows = []
    for passes in args.passes:
        step = step_ms(lambda steps: canvases(1, steps), passes, device, max(2, args.repeats // 3))
        wall = median_ms(lambda: canvases(args.canvases, passes), device, max(1, args.repeats // 3), warmup=1)
        rows.append({"system": "transformers", "version": transformers.__version__, "mode": "eager", "batch": b,
                     "prompt_len": ids.shape[1], "canvas_length": c, "passes": passes, "step_ms": round(step, 3),
                     "tokens_per_s": round(b * args.canvases * c / (wall / 1e3), 2), "wall_s": round(wall / 1e3, 4),
                     "step_over_floor": round(step / floor, 3) if floor else None})
    hf = None
    free(device)
    return rows


def measure_ar(dg: DiffusionGemma, ids: torch.Tensor, args) -> dict:
    """dgemma's autoregressive mode on the same weights (greedy, one token per encoder pass, KV cache) for as
    many tokens as the diffusion rows generate: `--canvases` canvases."""
    device, c = dg.device, dg.config.canvas_length
    b, n = ids.shape[0], args.canvases * c
    log(f"dgemma AR batch {b}")
    dev_ids = ids.to(device)
    wall = median_ms(lambda: dg.generate_ar(dev_ids, max_new_tokens=n, eos_token_id=[]), device,
                     max(1, args.repeats // 3), warmup=1)
    # the default path: on the CPU its one-token steps are replayed from a trace after the first few
    mode = "traced" if dg.model.trace_passes and device.type == "cpu" else "eager"
    return {"system": "dgemma_ar", "mode": mode, "batch": b, "prompt_len": ids.shape[1], "canvas_length": c,
            "new_tokens": b * n, "tokens_per_s": round(b * n / (wall / 1e3), 2), "wall_s": round(wall / 1e3, 4),
            "ms_per_token_step": round(wall / n, 3)}


def guarded(result: dict, what: str, fn) -> None:
    try:
        fn()
    except Exception as e:  # one failing variant must not lose the others' numbers
        log(f"{what} failed: {e!r}")
        result["errors"].append({"what": what, "error": repr(e), "trace": traceback.format_exc()[-2000:]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def machine(device: torch.device) -> dict[str, Any]:
    import platform
    info = {"torch": torch.__version__, "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_GB=round(p.total_memory / 1e9, 1), sms=p.multi_processor_count)
    else:
        info["cpu"] = cpu_model()
    return info


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emit(args, result: dict) -> None:
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2))
