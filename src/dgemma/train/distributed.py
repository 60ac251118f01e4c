"""Data-parallel training across processes started by `torchrun` (gloo on CPU, NCCL on CUDA).

Every process holds the whole global batch and its canvas plan (both are drawn from the run seed), takes its
own slice of rows, and sums gradients over processes. Losses are already divided by global token counts, so the
summed gradient is the single-process gradient of the same global batch. Replicated parameters (the default)
sum their gradients with one all-reduce per optimizer step; sharded ones (`--fsdp`, `dgemma.train.sharded`)
with FSDP's reduce-scatter during the backward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..config import ConfigError

# what torchrun sets for each process, and init_process_group reads
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # parameters sharded by FSDP, which reduces their gradients itself

    @classmethod
    def start(cls, device: torch.device, sharded: bool = False) -> "Distributed":
        """Join the process group when launched by torchrun (WORLD_SIZE > 1, or always when `sharded`); otherwise
        a single process."""
        if sharded:
            missing = [name for name in TORCHRUN_ENV if name not in os.environ]
            if missing:
                raise ConfigError(f"--fsdp runs under torchrun (torchrun --nproc_per_node N -m dgemma train --fsdp "
                                  f"...; N may be 1): {', '.join(missing)} not set")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 and not sharded:
            return cls(0, 1, device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, sharded)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_rows(self, n: int) -> torch.Tensor:
        """This process's share of `n` global rows (contiguous, sizes differ by at most one)."""
        return torch.arange(n).tensor_split(self.world_size)[self.rank]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Fill missing gradients with zeros (experts that saw no token) and sum them over processes (sharded
        parameters' gradients are summed already)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size == 1 or self.sharded:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def clip_gradients(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Scale the gradients to a total norm of at most `max_norm`; returns the norm before. Over sharded
        gradients the norm is of the whole gradient, summed over the processes' shards."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def sum(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sum scalar metrics over processes."""
        keys = sorted(values)
        flat = torch.stack([values[k].detach().double().reshape(()) for k in keys]).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(flat)
        return dict(zip(keys, flat.tolist()))

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (e.g. a stop signal seen by one)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
