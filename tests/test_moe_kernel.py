"""The Triton expert kernel (`dgemma.model.moe_kernel`) on the CPU, in Triton's interpreter: the same kernel
source that runs on the GPU, checked against torch's grouped matmul with fp32 activations (tests/test_cuda.py
runs it compiled, in bf16, on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dgemma import DiffusionGemma
from dgemma.config import preset

pytest.importorskip("triton", minversion="3.7")  # older interpreters cannot run the kernel
if torch.cuda.is_available():
    pytest.skip("a GPU is present: tests/test_cuda.py runs the compiled kernel", allow_module_level=True)

from dgemma.model import moe_kernel  # noqa: E402
from dgemma.model.moe_kernel import TritonExperts, grouped_matmul, quantize_rowwise  # noqa: E402


def groups(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row r times its group's weight [N, K] transposed, one group at a time."""
    starts = [0] + offsets[:-1].tolist()
    return torch.cat([x[s:e] @ w[i].T for i, (s, e) in enumerate(zip(starts, offsets.tolist()))])


# empty groups (first, middle, last), a group longer than BLOCK_M (several row blocks), N and K that are not
# multiples of the tiles (masked edges), fewer rows than groups
@pytest.mark.parametrize("counts, n, k", [
    ([0, 3, 0, 21, 5, 0], 40, 48),
    ([1, 1], 128, 64),
    ([0, 2, 0, 0], 33, 17),
])
def test_grouped_matmul_matches_per_group_matmul(counts, n, k):
    g = torch.Generator().manual_seed(sum(counts))
    offsets = groups(counts)
    x = torch.randn(int(offsets[-1]), k, generator=g)
    w = torch.randn(len(counts), n, k, generator=g) * 0.1
    got = grouped_matmul(x, w, offsets, block_m=16, block_n=32, block_k=32)
    want = reference(x, w, offsets)
    assert got.shape == want.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if k % 4 == 0:  # torch's grouped_mm needs 16-byte strides; the kernel does not
        torch.testing.assert_close(got, F.grouped_mm(x, w.transpose(-2, -1), offs=offsets), rtol=1e-5, atol=1e-5)


def test_fp8_weights_are_dequantised_per_output_channel():
    g = torch.Generator().manual_seed(1)
    offsets = groups([4, 0, 19, 9])
    x = torch.randn(int(offsets[-1]), 64, generator=g)
    w = torch.randn(4, 48, 64, generator=g) * torch.logspace(-3, 1, 48)[None, :, None]  # channels of every scale
    q, scale = quantize_rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 48)
    assert (q.float().abs().amax(dim=-1) == moe_kernel.E4M3_MAX).all()  # each channel's largest value at the top
    dequantised = q.float() * scale[..., None]
    # e4m3: 3 mantissa bits (half a step: 2^-4 relative), subnormals spaced 2^-9 in units of the scale
    assert ((dequantised - w).abs() <= w.abs() * 2 ** -4 + scale[..., None] * 2 ** -10).all()
    got = grouped_matmul(x, q, offsets, scale, block_m=16, block_n=32, block_k=32)
    torch.testing.assert_close(got, reference(x, dequantised, offsets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8, tol", [(False, 1e-5), (True, 0.05)])
def test_triton_experts_in_the_model_match_grouped_mm(fp8, tol):
    dg = DiffusionGemma.from_config(preset("tiny"), seed=0)
    model = dg.model
    canvas = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden_ref, kv = model.encode_sequence(torch.randint(3, 500, (2, 12)))
        context = kv.at(torch.tensor([12, 12]))
        want = model.denoise(canvas, context)
        for layer in model.layers:
            layer.experts.kernel = TritonExperts(layer.experts.gate_up_proj.data, layer.experts.down_proj.data, fp8)
        got = model.denoise(canvas, context)
    assert ((got - want).norm() / want.norm()).item() < tol


def test_kernel_errors_are_specific():
    offsets = groups([2, 2])
    with pytest.raises(ValueError, match="shapes/strides do not fit"):
        grouped_matmul(torch.randn(4, 16), torch.randn(2, 8, 32), offsets)
    dg = DiffusionGemma.from_config(preset("tiny"), seed=0)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        moe_kernel.use_triton_experts(dg.model)
