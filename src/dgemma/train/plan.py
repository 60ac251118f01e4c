"""How much memory a training setup takes per process, from the model config alone (`dgemma train --plan`).

Nothing is built: parameter counts come from the config's sizes (the same as the model's own, tested), and the
activations from a count of what autograd keeps for the backward pass of the objective (`TrainingStep`), layer
by layer. Per process:

- parameters: float32 master weights (LoRA: the frozen base in `--dtype`, the adapters in float32), divided by
  the processes when sharded; sharded, also the weights gathered for compute (in the compute dtype): the root
  (embedding, final norm, self-conditioning) for the whole step and two layers at a time (the one running and
  the one prefetched);
- gradients: float32 for the trained weights (sharded: 1/N, plus the unsharded gradients of the root and of one
  layer before they are reduce-scattered); replicated processes also build one flat buffer of all gradients
  for the all-reduce;
- optimizer: AdamW's two float32 moments per trained weight (sharded: 1/N);
- activations: what the encoder pass, the self-conditioning pass and the decoder pass keep for the backward
  pass at the process's rows of one micro-batch (batch / processes / accumulation), in the compute dtype, with
  the vocabulary-wide tensors (logits, their log-softmax, self-conditioning's probabilities) in float32, plus
  the logits the step holds while it runs. `--grad-checkpoint` keeps each layer's input only (and the
  encoder's keys and values, which the decoder reads), plus one layer's activations recomputed at a time.

With CPU offload the sharded weights, their gradients and the optimizer state live in host memory instead.
Estimates: allocator fragmentation, the CUDA context and communication buffers come on top, so a setup is
said to fit a GPU when the estimate leaves 10% of its memory free.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DiffusionGemmaConfig, TextConfig

GPU_BYTES = 80 * 10**9  # an 80 GB GPU
FIT_FRACTION = 0.9
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Setup:
    world_size: int = 1
    fsdp: bool = False
    offload: bool = False
    lora: int = 0  # adapter rank; 0: full training
    dtype: str = "float32"  # of the frozen base under LoRA
    compute: str = "bfloat16"  # what the passes compute in (autocast on CUDA; float32 on the CPU)
    batch_size: int = 8
    seq_len: int = 512
    accum: int = 1
    grad_checkpoint: bool = False

    def describe(self) -> str:
        how = ("sharded" + (" + offload" if self.offload else "")) if self.fsdp else "replicated"
        what = f"LoRA r{self.lora} ({self.dtype} base)" if self.lora else "full"
        return f"{what}, {how}, {self.world_size} process{'es' if self.world_size > 1 else ''}"


@dataclass(frozen=True)
class ParameterCounts:
    root: int  # outside the layers: embedding (= LM head), final norm, self-conditioning
    layers: tuple[int, ...]
    root_adapters: int  # LoRA adapter weights at rank 1 (scale by the rank)
    layer_adapters: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.root + sum(self.layers)


def parameter_counts(config: DiffusionGemmaConfig) -> ParameterCounts:
    t = config.text_config
    h, i_dense = t.hidden_size, t.intermediate_size
    mlp = 3 * h * i_dense  # gate, up, down
    mlp_adapters = 2 * (h + i_dense) + (i_dense + h)  # rank-1 A and B of gate, up (h -> i) and down (i -> h)
    layers, adapters = [], []
    for layer in range(t.num_hidden_layers):
        d, nkv, nq = t.layer_head_dim(layer), t.layer_kv_heads(layer), t.num_attention_heads
        projections = {"q_proj": (h, nq * d), "k_proj": (h, nkv * d), "o_proj": (nq * d, h)}
        if t.is_sliding(layer):
            projections["v_proj"] = (h, nkv * d)
        attention = sum(a * b for a, b in projections.values()) + 2 * d  # + q_norm, k_norm
        router = h * t.num_experts + h + t.num_experts
        experts = t.num_experts * 3 * t.moe_intermediate_size * h
        layers.append(attention + mlp + router + experts + 7 * h)  # + seven norms
        adapters.append(sum(a + b for a, b in projections.values()) + mlp_adapters)
    root = t.vocab_size * h + h + (h + mlp)  # embedding, final norm, self-conditioning (pre-norm, MLP)
    return ParameterCounts(root, tuple(layers), mlp_adapters, tuple(adapters))


def _layer_elements(t: TextConfig, layer: int, tokens: int, rows: int, keys_per_row: int | None,
                    lora: int = 0) -> int:
    """Elements one layer keeps for the backward pass over `tokens` positions; `keys_per_row`: a decoder pass's
    keys per row (context + canvas, copied together for attention), None for the encoder's own keys. With LoRA
    (`lora`: the rank) the frozen weights need no inputs kept for their gradients."""
    h, nq = t.hidden_size, t.num_attention_heads
    d, nkv = t.layer_head_dim(layer), t.layer_kv_heads(layer)
    k, m = t.top_k_experts, t.moe_intermediate_size
    sliding = t.is_sliding(layer)
    # q: projection and its norm (and the norm's unit, for its weight), rotated, attention output and its copy
    # for o_proj; k (and v): projection, norm; the norms' 1/rms
    attention = tokens * ((5 - bool(lora)) * nq * d + nq + (2 - bool(lora) + sliding) * nkv * d + 2 * nq + 2 * nkv)
    # the keys and values attention reads, and its boolean mask as an additive float one: the encoder's [L, L]
    # (the same for every row), a decoder row's over its keys
    if keys_per_row is None:
        length = tokens // rows
        attention += tokens * 2 * nkv * d + length * length
    else:
        attention += rows * keys_per_row * (2 * nkv * d + 1)
    dense = tokens * 4 * t.intermediate_size  # gate, gelu(gate), up, their product
    router = tokens * (t.num_experts + 4 * k)
    if lora:
        norms = tokens * (8 * h + 12)  # the norms' inputs, and their outputs where an adapter keeps them
        experts = tokens * k * (h + 3 * m + 3)  # gate/up, gelu, outputs; order, weights
        adapters = tokens * 7 * lora  # each adapter's A output
        return attention + norms + dense + router + experts + adapters
    norms = tokens * (17 * h + 12)  # seven norms' inputs, units and outputs where a matmul keeps them
    experts = tokens * k * (2 * h + 4 * m + 3)  # routed rows, gate/up, gelu, product, outputs; order, weights
    return attention + norms + dense + router + experts


@dataclass(frozen=True)
class Activations:
    saved: int  # bytes autograd keeps at the end of the forward pass
    peak: int  # saved + what the step holds besides at its peak (logits; a recomputed layer)


def activation_bytes(config: DiffusionGemmaConfig, rows: int, seq_len: int, grad_checkpoint: bool = False,
                     compute: str = "float32", lora: int = 0) -> Activations:
    """Activations of one micro-batch of `rows` rows of `seq_len` tokens (each row's canvas: the config's
    canvas length), every token a target (the most a row can cost); `lora`: the adapters' rank, 0 for full
    training."""
    t = config.text_config
    a = _DTYPE_BYTES[compute]
    c, v, h, n = config.canvas_length, t.vocab_size, t.hidden_size, t.num_hidden_layers
    enc, dec = rows * seq_len, rows * c
    layer_elements = [_layer_elements(t, i, enc, rows, None, lora) + _layer_elements(t, i, dec, rows, seq_len + c, lora)
                      for i in range(n)]
    if grad_checkpoint:
        # each layer's input in both passes, and the encoder's keys and values (the decoder's context)
        layers = n * (enc + dec) * h + sum(enc * 2 * t.layer_kv_heads(i) * t.layer_head_dim(i) for i in range(n))
        recompute = max(layer_elements) * a
    else:
        layers, recompute = sum(layer_elements), 0
    rope = 2 * (enc + dec) * (t.head_dim + t.global_head_dim)  # cos and sin per attention kind
    # final norms and the heads' inputs; self-conditioning's norms and MLP; token ids (int64)
    other = 3 * h * (enc + dec) + dec * (4 * h + 4 * t.intermediate_size) + 2 * (enc + dec)
    # float32, vocabulary-wide: soft-capped logits and their log-softmax (AR positions, canvas places), and the
    # probabilities self-conditioning embeds (kept for the embedding's gradient: not with LoRA, which freezes it)
    vocab = 4 * v * (2 * (enc - rows) + 2 * dec + (0 if lora else dec))
    saved = (layers + rope + other) * a + vocab
    # held while the step runs: the AR logits, the first pass's and the decoder's logits (float32)
    held = 4 * v * ((enc - rows) + 2 * dec)
    return Activations(saved, saved + max(held, recompute))


@dataclass(frozen=True)
class Memory:
    """Bytes per process."""

    parameters: int  # kept between steps (sharded: this process's shards)
    gathered: int  # sharded: weights gathered for compute while the step runs
    gradients: int  # kept until the optimizer step (sharded: this process's shards)
    unsharded_gradients: int  # sharded: gradients before their reduce-scatter, and the all-reduce's flat buffer
    optimizer: int
    activations: int
    host: int  # offloaded shards, gradients and optimizer state (CPU memory)

    @property
    def device(self) -> int:
        return (self.parameters + self.gathered + self.gradients + self.unsharded_gradients + self.optimizer
                + self.activations)

    def fits(self, device_bytes: int = GPU_BYTES) -> bool:
        return self.device <= FIT_FRACTION * device_bytes


def memory(config: DiffusionGemmaConfig, setup: Setup) -> Memory:
    counts = parameter_counts(config)
    n = setup.world_size
    compute = _DTYPE_BYTES[setup.compute]
    if setup.lora:
        base, trained = counts.total, setup.lora * (counts.root_adapters + sum(counts.layer_adapters))
        resident = _DTYPE_BYTES[setup.dtype] * base + 4 * trained
        root_trained, layer_trained = setup.lora * counts.root_adapters, setup.lora * max(counts.layer_adapters)
    else:
        trained = counts.total
        resident = 4 * trained
        root_trained, layer_trained = counts.root, max(counts.layers)
    grads, optim = 4 * trained, 8 * trained
    gathered = unsharded_grads = host = 0
    if setup.fsdp:
        resident, grads, optim = resident // n, grads // n, optim // n
        gathered = compute * (counts.root + 2 * max(counts.layers))
        unsharded_grads = compute * root_trained + (compute + 4) * layer_trained
        if setup.offload:
            host = resident + grads + optim
            resident = grads = optim = 0
    elif n > 1:
        unsharded_grads = grads  # the flat buffer of the all-reduce
    rows = -(-setup.batch_size // (n * setup.accum))
    acts = activation_bytes(config, rows, setup.seq_len, setup.grad_checkpoint, setup.compute, setup.lora).peak
    return Memory(resident, gathered, grads, unsharded_grads, optim, acts, host)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f}"


def format_plan(config: DiffusionGemmaConfig, name: str, setup: Setup, world_sizes: tuple[int, ...] = (1, 2, 4, 8)
                ) -> str:
    """The setup's memory per process, then the same batch on other setups, each saying whether it fits an
    80 GB GPU."""
    counts = parameter_counts(config)
    rows = -(-setup.batch_size // (setup.world_size * setup.accum))
    lines = [f"model {name}: {counts.total:,} parameters ({counts.root:,} outside the layers); batch "
             f"{setup.batch_size} x {setup.seq_len} tokens (+ a {config.canvas_length}-token canvas per row), "
             f"{rows} row(s) per process per micro-batch; compute {setup.compute}"
             f"{'; activation checkpointing' if setup.grad_checkpoint else ''}",
             "GiB per process: parameters, gradients, optimizer state, activations, total on the GPU (host: CPU "
             f"memory with offload); fits: at most {FIT_FRACTION:.0%} of an 80 GB GPU", ""]
    header = f"{'setup':<58} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8} {'host':>8}  fits"
    lines += [header, "-" * len(header)]

    def row(s: Setup) -> str:
        m = memory(config, s)
        return (f"{s.describe():<58} {_gib(m.parameters + m.gathered):>8} "
                f"{_gib(m.gradients + m.unsharded_gradients):>8} {_gib(m.optimizer):>8} "
                f"{_gib(m.activations):>8} {_gib(m.device):>8} {_gib(m.host):>8}  {'yes' if m.fits() else 'no'}")

    lines.append(row(setup))
    lines += ["", "the same batch on other setups:"]
    lora = setup.lora or 16
    for n in world_sizes:
        for fsdp, offload in ((False, False), (True, False), (True, True)):
            for r, dtype in ((0, "float32"), (lora, setup.dtype if setup.lora else "bfloat16")):
                other = Setup(n, fsdp, offload, r, dtype, setup.compute, setup.batch_size, setup.seq_len,
                              setup.accum, setup.grad_checkpoint)
                if other != setup and setup.batch_size % n == 0:
                    lines.append(row(other))
    return "\n".join(lines)
