"""The KV cache: preallocated per layer, owned by the engine, one length per row.

Layout per layer: `[batch, kv_heads, capacity + canvas_length, head_dim]`. Full-attention layers hold
every position (`capacity = max_len`); sliding layers are ring buffers of `sliding_window - 1` slots,
exactly the context the reference keeps for them. The tail after the used slots is scratch where a
decoder pass puts the canvas keys/values, so denoising never copies the cache. `slot_pos` records the
position held by each slot (-1: empty), which is all the masks need.
"""

from __future__ import annotations

import torch

from ..config import FULL, SLIDING, TextConfig


class CacheFullError(ValueError):
    """More tokens than the cache was sized for."""


class KVCache:
    def __init__(self, config: TextConfig, batch: int, max_len: int, canvas_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if config.sliding_window < 2:
            raise ValueError(f"sliding_window must be >= 2, got {config.sliding_window}")
        self.batch, self.max_len, self.canvas_length = batch, max_len, canvas_length
        self.window = config.sliding_window
        self.kinds = list(config.layer_types)
        self.capacity = {FULL: max_len, SLIDING: min(config.sliding_window - 1, max_len)}
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i, kind in enumerate(self.kinds):
            shape = (batch, config.layer_kv_heads(i), self.capacity[kind] + canvas_length, config.layer_head_dim(i))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        # one extra column: the slot that writes of padding tokens are sent to
        self.slot_pos = {kind: torch.full((batch, self.capacity[kind] + 1), -1, dtype=torch.long, device=device)
                         for kind in set(self.kinds)}
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def used(self, kind: str) -> int:
        """Slots [0, used) may hold tokens for some row; the canvas scratch starts right after."""
        return min(self.capacity[kind], int(self.lengths.max()))

    def check_room(self, new_tokens: torch.Tensor) -> None:
        need = int((self.lengths + new_tokens).max())
        if need > self.max_len:
            raise CacheFullError(f"{need} tokens do not fit a cache sized for {self.max_len}")

    def write_slots(self, kind: str, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Slot of each new token [B, T]; tokens that must not be stored go to the trash slot."""
        cap = self.capacity[kind]
        trash = torch.full_like(positions, cap)
        if kind == FULL:
            return torch.where(valid, positions, trash)
        # a ring keeps only each row's last `cap` new tokens (earlier ones would be overwritten anyway)
        n_valid = valid.sum(dim=1, keepdim=True)
        keep = valid & (torch.arange(positions.shape[1], device=positions.device) >= n_valid - cap)
        return torch.where(keep, positions % cap, trash)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v [B, kv_heads, T, D] into `slots` [B, T]."""
        rows = torch.arange(self.batch, device=k.device)[:, None].expand_as(slots)
        self.k[layer][rows, :, slots] = k.transpose(1, 2)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)

    def commit(self, slots: dict[str, torch.Tensor], positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Record the positions of the tokens written by an encoder pass."""
        for kind, s in slots.items():
            rows = torch.arange(self.batch, device=s.device)[:, None].expand_as(s)
            self.slot_pos[kind][rows, s] = torch.where(valid, positions, torch.full_like(positions, -1))
            self.slot_pos[kind][:, -1] = -1
        self.lengths += valid.sum(dim=1)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty the given rows (a finished request frees its slot)."""
        for pos in self.slot_pos.values():
            pos[rows] = -1
        self.lengths[rows] = 0
