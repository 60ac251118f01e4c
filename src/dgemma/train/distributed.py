"""Data-parallel training across processes started by `torchrun` (gloo on CPU, NCCL on CUDA).

Every process holds the whole global batch and its canvas plan (both are drawn from the run seed), takes its
own slice of rows, and sums gradients with one all-reduce per optimizer step. Losses are already divided by
global token counts, so the summed gradient is the single-process gradient of the same global batch.
Parameters are replicated (no sharding); FSDP for models too large for one device is a follow-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def start(cls, device: torch.device) -> "Distributed":
        """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_rows(self, n: int) -> torch.Tensor:
        """This process's share of `n` global rows (contiguous, sizes differ by at most one)."""
        return torch.arange(n).tensor_split(self.world_size)[self.rank]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Fill missing gradients with zeros (experts that saw no token) and sum them over processes."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

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
