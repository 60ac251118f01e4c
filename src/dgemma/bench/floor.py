"""The floor under a decoder pass: the least time the hardware allows, from two measured rates.

- bandwidth: every weight byte is read once per pass (a 256-token canvas touches every expert), so a pass
  takes at least weight bytes / the device's measured copy bandwidth (bytes read plus written, as a
  device-to-device copy moves them). What bounds a GPU at small batch.
- compute: the pass's floating-point operations (counted by torch's `FlopCounterMode` on a real pass, with
  formulas added for the grouped expert GEMM and CPU flash attention, which it does not count) over the
  device's best measured matmul rate at the pass's own GEMM shapes. What bounds a CPU, where a
  256-token canvas is compute-bound: everything else in the pass (sampling, norms, attention softmax) is
  extra time on top of it.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils import flop_counter

from ..model.model import DiffusionGemmaModel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float | None:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (None on the CPU)."""
    if device.type != "cuda":
        return None
    bufs = [torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_() for _ in range(3)]
    dst = torch.empty_like(bufs[0])
    i = [0]

    def copy():
        dst.copy_(bufs[i[0] % 3])
        i[0] += 1

    ms = median_ms(copy, device, 10)
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3)


def weight_bytes(model: DiffusionGemmaModel) -> dict[str, int]:
    """Bytes a decoder pass streams, by dtype: every parameter once (a 256-token canvas touches every expert),
    FP8 experts counted at their FP8 size."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.stride() and min(p.stride()) == 0:  # released (FP8 experts hold the weights)
            continue
        key = str(p.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    for layer in model.layers:
        kernel = layer.experts.kernel
        if kernel is not None and kernel.fp8:
            out["float8_e4m3fn"] = out.get("float8_e4m3fn", 0) + kernel.nbytes
    return out


def _register_flop_formulas() -> None:
    registry = flop_counter.flop_registry

    def grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # [rows, K] x [groups, K, N] -> every row goes through one group's K x N matrix
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]

    def cpu_flash(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, t, d = q_shape
        return 4 * b * h * t * k_shape[-2] * d  # Q K^T and P V (GQA: every query head)

    for op, fn in ((getattr(torch.ops.aten, "_grouped_mm", None), grouped_mm),
                   (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None), cpu_flash)):
        if op is not None and op not in registry:
            flop_counter.register_flop_formula(op)(fn)


def pass_flops(model: DiffusionGemmaModel, run) -> int:
    """Floating-point operations of `run()` (a decoder pass)."""
    _register_flop_formulas()
    with torch.inference_mode():
        run()  # once uncounted: a first call may check things once (`dgemma.model.vocab`)
    with torch.inference_mode(), flop_counter.FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def gemm_rate(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    """FLOP/s of an [m, k] x [k, n] matmul on `device`."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, 10)
    return 2 * m * k * n / (ms / 1e3)


def compute_floor(model: DiffusionGemmaModel, run, tokens: int) -> dict[str, float]:
    """`pass_gflop` of `run()` (one decoder pass over `tokens` canvas positions), the device's best `gemm_gflops`
    at the pass's own GEMM shapes (the LM head and the dense MLP, over all its rows or one canvas of 256), and
    their quotient `compute_floor_ms`."""
    flops = pass_flops(model, run)
    t = model.text
    rate = max(gemm_rate(model.device, model.dtype, m, t.hidden_size, n)
               for m in sorted({tokens, min(tokens, 256)}) for n in (t.vocab_size, t.intermediate_size))
    return {"pass_gflop": round(flops / 1e9, 3), "gemm_gflops": round(rate / 1e9, 1),
            "compute_floor_ms": round(flops / rate * 1e3, 3)}
