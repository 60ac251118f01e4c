#!/usr/bin/env python
"""The expert matmuls of one 26B-A4B layer on a CUDA GPU: torch's grouped_mm against dgemma's Triton kernel
(bf16 and FP8 weights, a sweep of tile shapes), with the achieved weight bandwidth of each.

    python benchmarks/moe_kernel.py                 # table + JSON line at the end
    python benchmarks/moe_kernel.py --rows 2048,8192 --experts 128 --hidden 2816 --inner 704 --top-k 8

Rows = canvas tokens x top-k (a 256-token canvas: 2048 rows at batch 1). Routing is uniform at random, so every
expert gets about rows / experts rows, as a trained router roughly does over a canvas.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from dgemma.model.moe_kernel import grouped_matmul, quantize_rowwise


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="2048,8192")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--inner", type=int, default=704)
    p.add_argument("--sweep", action="store_true", help="try tile shapes too")
    args = p.parse_args()
    e, h, d = args.experts, args.hidden, args.inner
    g = torch.Generator("cuda").manual_seed(0)
    # several weight sets, rotated, so repeated runs do not measure the L2 cache
    sets = [(torch.randn(e, 2 * d, h, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02,
             torch.randn(e, h, d, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02) for _ in range(3)]
    q = [(quantize_rowwise(a), quantize_rowwise(b)) for a, b in sets]
    wbytes = sum(t.numel() * 2 for t in sets[0])
    out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, h, device="cuda", generator=g, dtype=torch.bfloat16)
        xd = torch.randn(rows, d, device="cuda", generator=g, dtype=torch.bfloat16)
        ids = torch.randint(0, e, (rows,), device="cuda", generator=g).sort().values
        offs = torch.searchsorted(ids, torch.arange(e, device="cuda"), right=True, out_int32=True)
        i = [0]

        def both(fn):
            def run():
                k = i[0] % 3
                i[0] += 1
                fn(k)
            return run

        def torch_mm(k):
            F.grouped_mm(x, sets[k][0].transpose(-2, -1), offs=offs)
            F.grouped_mm(xd, sets[k][1].transpose(-2, -1), offs=offs)

        def tri(k, fp8=False, **kw):
            if fp8:
                (w1, s1), (w2, s2) = q[k]
                grouped_matmul(x, w1, offs, s1, **kw)
                grouped_matmul(xd, w2, offs, s2, **kw)
            else:
                grouped_matmul(x, sets[k][0], offs, **kw)
                grouped_matmul(xd, sets[k][1], offs, **kw)

        ref = F.grouped_mm(x, sets[0][0].transpose(-2, -1), offs=offs)
        err = rel(grouped_matmul(x, sets[0][0], offs), ref)
        err8 = rel(grouped_matmul(x, q[0][0][0], offs, q[0][0][1]), ref)
        t_torch = do_bench(both(torch_mm), warmup=50, rep=300, return_mode="median")
        t_tri = do_bench(both(tri), warmup=50, rep=300, return_mode="median")
        t_fp8 = do_bench(both(lambda k: tri(k, True)), warmup=50, rep=300, return_mode="median")
        row = {"rows": rows, "weight_MB": wbytes / 1e6, "grouped_mm_ms": t_torch, "triton_ms": t_tri,
               "triton_fp8_ms": t_fp8, "grouped_mm_GBps": wbytes / t_torch / 1e6, "triton_GBps": wbytes / t_tri / 1e6,
               "fp8_GBps_of_bf16_bytes": wbytes / t_fp8 / 1e6, "triton_rel_err": err, "fp8_rel_err": err8}
        if args.sweep:
            best = []
            for bm, bn, bk, nw, ns in itertools.product((16, 32, 64), (64, 128), (64, 128), (4,), (3, 4)):
                kw = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                try:
                    t = do_bench(both(lambda k: tri(k, **kw)), warmup=20, rep=100, return_mode="median")
                    t8 = do_bench(both(lambda k: tri(k, True, **kw)), warmup=20, rep=100, return_mode="median")
                except Exception as ex:  # a shape the compiler rejects (shared memory)
                    print("skip", kw, type(ex).__name__)
                    continue
                best.append((t, t8, kw))
            best.sort(key=lambda r: r[0])
            row["sweep_bf16_top"] = [(round(t, 4), kw) for t, _, kw in best[:5]]
            row["sweep_fp8_top"] = [(round(t8, 4), kw) for _, t8, kw in sorted(best, key=lambda r: r[1])[:5]]
        out.append(row)
        print(json.dumps(row))
    print("MOE_KERNEL_JSON " + json.dumps(out))


if __name__ == "__main__":
    main()
