"""Expert matmuls as one Triton kernel (CUDA): bf16 weights, or FP8 (e4m3) weights with one scale per output
channel, dequantised in registers (weight-only FP8: activations stay bf16).

A denoising pass over a 256-token canvas sends every expert ~16 rows (batch 1): each expert's matmul is a
thin [rows, K] x [K, N] product whose time is the time to read the expert's weights. The kernel gives each
(expert, N-tile) pair its own program, which streams that weight tile once for all of the expert's rows
(rows taken in chunks of BLOCK_M), so the weights go through at close to memory bandwidth. FP8 halves those
bytes. The rows arrive sorted by expert with `offsets[e]` the end of expert e's rows, exactly as
`torch.nn.functional.grouped_mm` takes them, so the kernel is a drop-in for it; no host sync, graph-safe.

`use_triton_experts(model, fp8=False)` switches every layer's experts to it (FP8 replaces the bf16 expert
weights and frees them). This is an inference-time transform: no gradients, no checkpoint format.

Without a GPU the kernel still runs in Triton's interpreter (`TRITON_INTERPRET=1` set before triton is
imported; numpy, slow): the test suite checks it that way on the CPU, with fp32 activations (the interpreter
does not round-trip bf16).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the kernel is simply not available
    triton = None


if triton is not None:
    @triton.jit
    def _grouped_gemm_kernel(a_ptr, w_ptr, scale_ptr, c_ptr, offs_ptr, N, K, stride_am, stride_we, stride_wn,
                             stride_cm, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        e = tl.program_id(0)
        pid_n = tl.program_id(1)
        end = tl.load(offs_ptr + e)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        w_base = w_ptr + e.to(tl.int64) * stride_we + rn[:, None] * stride_wn + rk[None, :]
        if HAS_SCALE:
            scale = tl.load(scale_ptr + e * N + rn, mask=n_ok, other=0.0)
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < end
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + rk) < K
                a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + (k0 + rk)[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_base + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(a, tl.trans(w.to(a.dtype)))
            if HAS_SCALE:
                acc = acc * scale[None, :]
            tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor | None = None,
                   block_m: int | None = None, block_n: int = 128, block_k: int = 128, num_warps: int = 4,
                   num_stages: int = 3) -> torch.Tensor:
    """x [M, K] bf16 rows sorted by group, weight [E, N, K] (bf16, or fp8 with `scale` [E, N]), offsets [E]
    int32 group ends -> [M, N] bf16, row r times its group's weight transposed."""
    if triton is None:
        raise RuntimeError("the Triton expert kernel needs triton (installed with CUDA builds of PyTorch)")
    m, k = x.shape
    e, n, k2 = weight.shape
    if k != k2 or weight.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"shapes/strides do not fit: x {list(x.shape)}, weight {list(weight.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if block_m is None:  # H100 sweep (benchmarks/moe_kernel.py): 32 rows up to ~16 rows per expert, then 64
        block_m = 32 if m <= 16 * e else 64
    grid = (e, triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](x, weight, scale if scale is not None else x, out, offsets, n, k, x.stride(0),
                               weight.stride(0), weight.stride(1), out.stride(0), HAS_SCALE=scale is not None,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                               num_stages=num_stages)
    return out


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (fp8 e4m3 values, fp32 scale per row [..., N]) with w ~= values * scale."""
    amax = w.abs().amax(dim=-1).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (w.float() / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class TritonProjection:
    """One grouped projection [E, N, K] run by the Triton kernel, in bf16 or FP8. Activations are cast to the
    dtype of the weights it was built from (bf16 on the GPU)."""

    def __init__(self, weight: torch.Tensor, fp8: bool):
        self.dtype = weight.dtype
        if fp8:
            self.weight, self.scale = quantize_rowwise(weight.detach())
        else:
            self.weight, self.scale = weight.detach(), None

    def __call__(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_matmul(x.to(self.dtype).contiguous(), self.weight, offsets, self.scale)

    @property
    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (0 if self.scale is None else self.scale.numel() * self.scale.element_size())


class TritonExperts:
    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, fp8: bool):
        self.fp8 = fp8
        self.gate_up = TritonProjection(gate_up_proj, fp8)
        self.down = TritonProjection(down_proj, fp8)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def use_triton_experts(model: torch.nn.Module, fp8: bool = False) -> int:
    """Run every layer's experts with the Triton kernel; with `fp8`, FP8 weights replace the bf16 ones (which
    are freed). Returns the bytes of FP8 weights held (0 without `fp8`)."""
    if triton is None or not torch.cuda.is_available() or model.embed_tokens.weight.device.type != "cuda":
        raise RuntimeError("Triton experts need the model on a CUDA GPU and triton installed")
    if model.embed_tokens.weight.dtype != torch.bfloat16:
        raise RuntimeError("Triton experts run bf16 models; load with dtype=torch.bfloat16")
    total = 0
    for layer in model.layers:
        experts = layer.experts
        if experts.kernel is not None and experts.kernel.fp8:
            raise RuntimeError("experts are already FP8: reload the model to change")
        experts.kernel = TritonExperts(experts.gate_up_proj.data, experts.down_proj.data, fp8)
        if fp8:
            total += experts.kernel.nbytes
            for name in ("gate_up_proj", "down_proj"):  # keep the parameters' shapes, release their memory
                p = getattr(experts, name)
                p.data = torch.zeros((1,) * p.dim(), dtype=p.dtype, device=p.device).expand(p.shape)
    torch.cuda.empty_cache()
    return total
