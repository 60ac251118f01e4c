"""The decoder pass with fixed shapes and addresses, captured once as a CUDA graph and replayed.

A denoising pass is the same computation every step of every canvas: only the canvas tokens, the
self-conditioning probabilities and (per canvas) the positions and the cache contents change. `StaticDenoiser`
keeps all of them in persistent buffers and attends over *every* slot of the cache under a mask (empty
slots masked out), so the shapes never change: the canvas keys/values go to the cache's scratch tail, which
sits right after the cached slots. On CUDA the pass is captured as a graph on first use; a replay then costs
one launch instead of the thousands of kernel launches of 30 layers (bf16 models; other dtypes and the CPU run
the same pass eagerly, and tests compare it with `DiffusionGemmaModel.denoise`).

The first step of a canvas has no self-conditioning signal: its soft embeddings are multiplied by zero, which
leaves the canvas embeddings exactly as the eager pass computes them.

`StaticPool` holds one cache + denoiser for the last batch shape, so repeated `generate` calls of the same
shape reuse the captured graph (the cache is emptied, not reallocated).
"""

from __future__ import annotations

import gc
import threading

import torch
import torch.nn.functional as F

from ..model.kv_cache import KVCache
from ..model.model import DiffusionGemmaModel


class StaticDenoiser:
    def __init__(self, model: DiffusionGemmaModel, cache: KVCache, graph: bool | None = None, compile: bool = False):
        self.model, self.cache = model, cache
        b, c, dev = cache.batch, cache.canvas_length, cache.device
        self.canvas = torch.zeros(b, c, dtype=torch.long, device=dev)
        self.cond_probs = torch.zeros(b, c, model.text.vocab_size, dtype=torch.float32, device=dev)
        self.cond_on = torch.zeros(b, dtype=model.dtype, device=dev)
        self.positions = torch.zeros(b, c, dtype=torch.long, device=dev)
        self.masks = {kind: torch.zeros(b, 1, 1, cap + c, dtype=torch.bool, device=dev)
                      for kind, cap in cache.capacity.items()}
        # torch's grouped_mm runs on CUDA in bf16 only (other dtypes take a path that syncs with the host)
        graphable = dev.type == "cuda" and model.dtype == torch.bfloat16
        if graph and not graphable:
            raise ValueError(f"CUDA graphs need a bf16 model on a CUDA device, not {model.dtype} on {dev}")
        self.use_graph = graphable if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        # the whole pass through torch.compile (fuses the elementwise work between the matmuls); a plain function,
        # not a bound method, so no reference cycle keeps a dropped denoiser's graph memory alive
        self._compiled = torch.compile(_static_pass, dynamic=False) if compile else None

    def run(self) -> torch.Tensor:
        return self._compiled(self) if self._compiled is not None else _static_pass(self)

    def prepare(self) -> None:
        """Take the positions and visible slots from the cache; call after every encoder pass."""
        cache, c = self.cache, self.cache.canvas_length
        self.positions.copy_(cache.lengths[:, None] + torch.arange(c, device=cache.device))
        for kind, mask in self.masks.items():
            cap = cache.capacity[kind]
            mask[:, 0, 0, :cap] = cache.slot_pos[kind][:, :cap] >= 0
            mask[:, 0, 0, cap:] = True

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph (allocator, cuBLAS handles, autotuning)
            for _ in range(2):
                self.run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.run()

    def __call__(self, canvas: torch.Tensor, self_cond_probs: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, C, V] of one decoder pass (on CUDA a buffer that the next call overwrites), self-conditioned
        on the previous pass's probabilities (fp32 softmax of its scaled logits; None on a first pass)."""
        self.canvas.copy_(canvas)
        if self_cond_probs is None:
            self.cond_on.zero_()
        else:
            self.cond_probs.copy_(self_cond_probs)
            self.cond_on.fill_(1)
        if not self.use_graph:
            return self.run()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out


def _static_pass(self: StaticDenoiser) -> torch.Tensor:
    model, cache = self.model, self.cache
    b, c = self.canvas.shape
    soft = model.embed_probs(self.cond_probs) * self.cond_on[:, None, None]
    x = model.self_conditioning(model.embed(self.canvas), soft)

    def attend(i, kind, proj, h, cos, sin):
        q, k, v = proj.qkv(h, cos, sin)
        cap = cache.capacity[kind]
        cache.k[i][:, :, cap:].copy_(k)
        cache.v[i][:, :, cap:].copy_(v)
        keys, values = cache.k[i], cache.v[i]
        if keys.is_cuda and keys.shape[-1] > 256:
            # no fused SDPA kernel takes GQA with head_dim > 256: expanding the few KV heads (cheap) lets the
            # memory-efficient kernel run instead of the fp32 math path
            groups = q.shape[1] // keys.shape[1]
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.masks[kind], scale=1.0,
                                             enable_gqa=keys.shape[1] != q.shape[1])
        return proj.o_proj(out.transpose(1, 2).reshape(b, c, -1))

    return model.logits(model._stack(x, self.positions, attend, decoder=True))


class StaticPool:
    """The cache and captured denoiser of the last shape used, reused while the shape repeats.

    One generation at a time holds them (`get` ... `release`): a generation that starts while another still
    runs on the same model (two interleaved streams, a `generate` inside a `stream_generate` loop, two threads)
    gets a cache and denoiser of its own, which are dropped when it ends, instead of resetting the other's.
    """

    ROUND = 256  # cache capacity rounded up to this, so nearby prompt lengths share one graph

    def __init__(self, graph: bool | None = None, compile: bool = False):
        self.graph = graph  # capture CUDA graphs (None: on CUDA, bf16)
        self.compile = compile  # the pass through torch.compile
        self.key = None
        self.cache: KVCache | None = None
        self.denoiser: StaticDenoiser | None = None
        self.busy = False
        self._lock = threading.Lock()

    def get(self, model: DiffusionGemmaModel, batch: int, max_len: int) -> tuple[KVCache, StaticDenoiser]:
        """A cache and denoiser for a generation of `batch` rows of up to `max_len` cached tokens; give them back
        with `release` when the generation ends."""
        max_len = -(-max_len // self.ROUND) * self.ROUND
        c = model.config.canvas_length
        with self._lock:
            shared = not self.busy
            self.busy = True
        if not shared:
            cache = KVCache(model.text, batch, max_len, c, model.dtype, model.device)
            return cache, StaticDenoiser(model, cache, self.graph, self.compile)
        try:
            return self._shared(model, batch, max_len, c)
        except BaseException:
            self.busy = False
            raise

    def _shared(self, model: DiffusionGemmaModel, batch: int, max_len: int, c: int
                ) -> tuple[KVCache, StaticDenoiser]:
        key = (batch, max_len, c, model.dtype, model.device)
        if key != self.key:
            self.key, self.cache, self.denoiser = None, None, None  # free the old graph's memory first
            if model.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            self.cache = KVCache(model.text, batch, max_len, c, model.dtype, model.device)
            self.denoiser = StaticDenoiser(model, self.cache, self.graph, self.compile)
            self.key = key
        self.cache.reset_rows(torch.arange(batch, device=model.device))
        return self.cache, self.denoiser

    def release(self, cache: KVCache) -> None:
        if cache is self.cache:
            self.busy = False
