"""Building blocks of the Gemma 4 MoE layer: norms, RoPE, attention projections, dense MLP, router, experts.

Notable: attention scaling is 1.0 (the scale lives in the per-head `q_norm`/`k_norm`); full-attention
layers have no `v_proj` (values are the normed keys before RoPE); full layers use *proportional* RoPE
(only the first `partial_rotary_factor` of the frequencies rotate, the rest are identity); every layer
runs a dense gated-GELU MLP and a top-k mixture of experts side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ROPE_TYPES, ConfigError, TextConfig


_CONSTANTS: dict[tuple[float, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(eps: float, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 0-dim CPU tensors (eps, dim) for `rms_norm` on the CPU; `RMSNorm` makes its own when it is built (a
    TorchScript trace that made them would make them again on every replay). Plain tensors only are kept: made
    outside inference mode (training may use them later), and not under a fake-tensor or other dispatch mode."""
    made = _CONSTANTS.get((eps, dim))
    if made is None:
        with torch.inference_mode(False):
            made = tuple(torch.tensor(v, dtype=torch.float32, device="cpu") for v in (eps, float(dim)))
        if all(type(t) is torch.Tensor for t in made):
            _CONSTANTS[eps, dim] = made
    return made


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in fp32, as the reference computes it (before any scale)."""
    # the dtype round trips only where they convert: a small model's pass runs ~70 norms, each op a dispatch
    xf = x if x.dtype == torch.float32 else x.float()
    if type(xf) is torch.Tensor and xf.device.type == "cpu":  # plain CPU tensors (not fake or other subclasses)
        # `mean` is a sum divided by the count, and a Python `eps` is wrapped into a tensor and converted on every
        # call: with both as fp32 tensors the same arithmetic runs without those conversions (same bits)
        eps_t, count = _norm_constants(eps, int(xf.shape[-1]))  # int(): a traced size is a tensor
        var = xf.pow(2).sum(-1, keepdim=True).div_(count).add_(eps_t)
    else:
        var = xf.pow(2).mean(-1, keepdim=True) + eps
    return xf * torch.pow(var, -0.5)  # pow(-0.5) rather than rsqrt: matches the reference bit for bit


def _scaled(unit: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    out = unit if weight is None else unit * (weight if weight.dtype == torch.float32 else weight.float())
    return out if out.dtype == dtype else out.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _scaled(_unit_rms(x, eps), weight, x.dtype)


def rms_norms(x: torch.Tensor, weights: tuple[torch.Tensor | None, ...], eps: float) -> tuple[torch.Tensor, ...]:
    """`rms_norm(x, w, eps)` for each w of `weights`, the normalisation itself computed once (the same bits as
    separate calls: a layer normalises its residual three times, for the dense MLP, the router and the experts,
    and a full-attention layer its keys twice, as keys and as values)."""
    unit = _unit_rms(x, eps)
    return tuple(_scaled(unit, w, x.dtype) for w in weights)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with `sin` as `rope_cos_sin` gives it: its first half negated, so that
    rotate_half(x) * sin = roll(x, half) * sin (the sign moves from x to sin: the same products, bit for bit,
    in 4 ops instead of 7)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gelu_tanh(gate) * up


# The elementwise pieces, each one fused kernel when `compile_elementwise()` has run (CUDA): a decoder pass of
# the 26B model is otherwise ~4,000 small kernels whose launches and memory round trips cost more than the
# weight streaming itself. Eager by default: the CPU path stays bit-identical to the reference.
PLAIN_KERNELS = {"rms_norm": rms_norm, "rms_norms": rms_norms, "apply_rope": apply_rope, "gelu_mul": gelu_mul}
KERNELS = dict(PLAIN_KERNELS)
_COMPILED: dict = {}  # built once: a fresh torch.compile wrapper would compile every shape again


def compile_elementwise(enable: bool = True) -> None:
    """Swap the elementwise pieces for `torch.compile`d versions (or back). Process-wide."""
    if not enable:
        KERNELS.update(PLAIN_KERNELS)
        return
    if _COMPILED:
        KERNELS.update(_COMPILED)
        return
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # one variant per shape: norms of several widths
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    _COMPILED.update({name: torch.compile(fn, dynamic=False) for name, fn in PLAIN_KERNELS.items()})
    KERNELS.update(_COMPILED)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; `with_scale=False` is the scale-free variant (values, router, self-cond)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        _norm_constants(eps, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return KERNELS["rms_norm"](x, self.weight, self.eps)


def shared_norms(x: torch.Tensor, *norms: RMSNorm) -> tuple[torch.Tensor, ...] | None:
    """`norm(x)` for each of `norms`, their common normalisation computed once, where nothing can tell; None where
    something could (the caller then runs the norms as modules): under autograd (the gradients of the separate
    norms add up in another order), with hooks on any of them, or with differing eps."""
    if (torch.is_grad_enabled() or len({n.eps for n in norms}) > 1 or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks or any(n._forward_hooks or n._forward_pre_hooks
                                                                   for n in norms)):
        return None
    return KERNELS["rms_norms"](x, tuple(n.weight for n in norms), norms[0].eps)


def rope_inv_freq(config: TextConfig, layer_type: str, head_dim: int) -> torch.Tensor:
    """Inverse frequencies of length head_dim/2. Proportional RoPE zero-pads the non-rotated part. Only the
    `default` and `proportional` types (TextConfig.validate refuses the others: never run as plain RoPE)."""
    params = config.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_parameters[{layer_type!r}]: rope_type {rope_type!r} is not supported")
    base = params["rope_theta"]
    factor = params.get("partial_rotary_factor", 1.0)
    if rope_type == "proportional":
        angles = int(factor * head_dim // 2)
        rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
        inv = torch.cat([rotated, torch.zeros(head_dim // 2 - angles)])
        return inv / params.get("factor", 1.0)
    dim = int(head_dim * factor)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin of shape [B, T, 1, head_dim] for integer positions [B, T], the first half of sin negated (what
    `apply_rope` takes)."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


class AttentionProjections(nn.Module):
    """q/k/v/o projections and per-head norms of one layer. The attention itself lives in the model,
    which knows whether this is an encoder (causal, cache write) or decoder (bidirectional) pass."""

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        h, nq = config.hidden_size, config.num_attention_heads
        self.head_dim = config.layer_head_dim(layer)
        self.num_kv_heads = config.layer_kv_heads(layer)
        self.num_heads = nq
        self.q_proj = nn.Linear(h, nq * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        # full-attention layers reuse the key projection as values ("k_eq_v")
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False) if config.is_sliding(layer) else None
        self.o_proj = nn.Linear(nq * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, H] -> q [B, nq, T, D], k and v [B, nkv, T, D] (RoPE applied to q and k)."""
        b, t, _ = x.shape
        q = KERNELS["apply_rope"](self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)), cos, sin)
        k_raw = self.k_proj(x).view(b, t, -1, self.head_dim)
        # full-attention layers: the values are the keys, normed without scale
        shared = shared_norms(k_raw, self.k_norm, self.v_norm) if self.v_proj is None else None
        if shared is None:
            v = self.v_norm(self.v_proj(x).view(b, t, -1, self.head_dim) if self.v_proj is not None else k_raw)
            k = self.k_norm(k_raw)
        else:
            k, v = shared
        k = KERNELS["apply_rope"](k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)): the dense feed-forward path and the self-conditioning MLP."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(KERNELS["gelu_mul"](self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Scale-free RMSNorm * scale * hidden^-0.5 -> linear -> softmax over all experts -> top-k, renormalised."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size ** -0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor, normed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k], expert ids [N, k]); `normed`: `self.norm(x)` where the caller has it."""
        scores = self.proj((self.norm(x) if normed is None else normed) * self.scale * self.root_size)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


class Experts(nn.Module):
    """The expert weights as 3-D tensors (HF layout), run as two grouped GEMMs over the tokens sorted by expert:
    no Python loop over tokens or experts. Same sort, kernel and per-token sum over the k choices as the
    reference, so results agree bit for bit."""

    def __init__(self, config: TextConfig):
        super().__init__()
        e, h, d = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * d, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, d))
        self.kernel = None  # `dgemma.model.moe_kernel.use_triton_experts`: the Triton kernel (bf16 or FP8)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, H], routing weights and expert ids [N, k] -> [N, H]."""
        n, k = ids.shape
        sorted_ids, order = torch.sort(ids.reshape(-1))
        # end of each expert's group (= cumsum of bincount, without bincount's host sync on CUDA)
        offsets = torch.searchsorted(sorted_ids, torch.arange(self.num_experts, device=ids.device), right=True,
                                     out_int32=True)
        # index_select copies the same rows with less overhead; its backward sums the k copies of a row in another
        # order than indexing's, so under autograd the indexing stays (gradients keep their bits)
        routed = x[order // k] if torch.is_grad_enabled() else x.index_select(0, order // k)
        if self.kernel is not None:
            gate, up = self.kernel.gate_up(routed, offsets).chunk(2, dim=-1)
            out = self.kernel.down(KERNELS["gelu_mul"](gate, up), offsets)
        else:
            routed = routed.to(self.gate_up_proj.dtype)
            gate, up = F.grouped_mm(routed, self.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
            out = F.grouped_mm(KERNELS["gelu_mul"](gate, up), self.down_proj.transpose(-2, -1), offs=offsets)
        out = out * weights.reshape(-1)[order, None]
        unsorted = torch.empty_like(out).index_copy_(0, order, out)
        return unsorted.view(n, k, -1).sum(dim=1).to(x.dtype)


class Block(nn.Module):
    """One transformer layer; `attend` is supplied by the caller (encoder or decoder attention)."""

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = AttentionProjections(config, layer)
        self.mlp = GatedMLP(h, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        # HF keeps one scalar per stack (buffers are not tied); checkpoints may store different values
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("decoder_layer_scalar", torch.ones(1))

    def feed_forward(self, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
        """The dense MLP and the experts side by side. With `split`, positions [:split] and [split:] of every row
        go through the experts as two separate groups of tokens, as they would in two passes."""
        # None (autograd, hooks): each norm runs as its module, in the reference's order
        shared = shared_norms(x, self.pre_feedforward_layernorm, self.router.norm, self.pre_feedforward_layernorm_2)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x) if shared is None
                                                           else shared[0]))
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.router(flat, None if shared is None else shared[1].reshape(flat.shape))
        normed = self.pre_feedforward_layernorm_2(flat) if shared is None else shared[2].reshape(flat.shape)
        if split is None:
            moe = self.experts(normed, weights, ids).reshape(x.shape)
        else:
            b, t, h = x.shape
            parts = [tuple(z.view(b, t, -1)[:, cols].reshape(-1, z.shape[-1]) for z in (normed, weights, ids))
                     for cols in (slice(None, split), slice(split, None))]
            moe = torch.cat([self.experts(*part).view(b, -1, h) for part in parts], dim=1)
        return self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe))

    def forward(self, x: torch.Tensor, attend, decoder: bool | torch.Tensor, split: int | None = None) -> torch.Tensor:
        """`attend(projections, normed_x)` is the pass's attention; `decoder` says which stack's scalar applies:
        for the whole batch, per row ([B] bool, a batch mixing encoder and decoder rows) or per position ([B, T]).
        `split`: see `feed_forward`."""
        x = x + self.post_attention_layernorm(attend(self.self_attn, self.input_layernorm(x)))
        x = x + self.feed_forward(x, split)
        if isinstance(decoder, torch.Tensor):
            flag = decoder[:, None, None] if decoder.dim() == 1 else decoder[:, :, None]
            return x * torch.where(flag, self.decoder_layer_scalar, self.layer_scalar)
        return x * (self.decoder_layer_scalar if decoder else self.layer_scalar)
