"""Sharded data parallelism (`dgemma train --fsdp`) on PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each process keeps 1/N of every weight, of its gradient and of AdamW's state. The units of sharding are the
transformer layers, each gathered whole right before it runs and freed after, and the root, the `TrainingStep`
with everything outside the layers (the embedding, which is also the LM head, the final norm,
self-conditioning), gathered for the whole step. The encoder and the decoder are one stack: a step runs each
layer up to three times (encoder, self-conditioning pass, decoder) and FSDP gathers it for each use, and again
for each use in the backward pass, where it reduce-scatters the gradients. For that, every use has to go through
module calls FSDP hooks, which is what `TrainingStep` is for.

Mixed precision: the gathered weights compute in `fsdp_dtype` (bfloat16 on CUDA by default) under autocast,
gradients are reduced and weights kept in float32. Gradients are summed over processes, not averaged: the loss
of each process is already divided by the global batch's token counts. With `fsdp_offload` the shards, their
gradients and the optimizer state stay in CPU memory and AdamW steps there.

The weights are built once: the main process loads them (or draws them from the seed, as one process would) on
the CPU, every process builds the model's structure on the meta device, shards it, and receives its shards from
the main process (`set_model_state_dict(broadcast_from_rank0=True)`), so no process ever holds the whole model on
its device.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from .config import TrainConfig
from .distributed import Distributed
from .objective import TrainingStep


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """What the gathered weights compute in: `--fsdp-dtype`, else bfloat16 on CUDA and float32 elsewhere."""
    if cfg.fsdp_dtype is not None:
        return getattr(torch, cfg.fsdp_dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def shard(step: TrainingStep, full_state: dict[str, torch.Tensor] | None, cfg: TrainConfig,
          dist: Distributed) -> None:
    """Shard `step` (built on the meta device) over the processes in place and fill the shards from
    `full_state`, the step's whole state dict on the main process (None on the others)."""
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    dtype = compute_dtype(cfg, dist.device)
    param_dtype = None if dtype == torch.float32 else dtype
    offload = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda") if cfg.fsdp_offload else OffloadPolicy()
    units: list[nn.Module] = []
    for layer in step.model.layers:
        fully_shard(layer, mesh=mesh, offload_policy=offload,
                    mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
        units.append(layer)
    # the root's inputs (the batch, the plan's noise levels) stay as they are: only the weights change dtype
    fully_shard(step, mesh=mesh, offload_policy=offload,
                mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                               cast_forward_inputs=False))
    units.append(step)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # a sum: the losses are divided by the global counts already
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)
    step.to_empty(device="cpu" if cfg.fsdp_offload else dist.device)
    step.model.init_rope()  # buffers outside the state dict
    set_model_state_dict(step, full_state if full_state is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for module in step.modules():  # buffers are not sharded: with offloading they still live where compute runs
        for name, buffer in module.named_buffers(recurse=False):
            module.register_buffer(name, buffer.to(dist.device), persistent=name not in
                                   module._non_persistent_buffers_set)


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """The autocast a sharded step runs under: bfloat16 where the weights compute in it (the model keeps a few
    float32 buffers, the layer scalars, that would otherwise promote activations back to float32)."""
    dtype = compute_dtype(cfg, device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
