"""The KV cache: preallocated per layer, the engine owns each instance; one length per row.

Layout per layer: `[batch, kv_heads, capacity + canvas_length, head_dim]`. Full-attention layers hold
every position (`capacity = max_len`); sliding layers hold each row's last `sliding_window - 1` tokens,
exactly the context the reference keeps for them, oldest first (the order of keys changes fp32 sums,
so keeping the reference's order keeps results bit-identical). The tail after the used slots is
scratch where a decoder pass puts the canvas keys/values, so denoising never copies the cache.
`slot_pos` records the position held by each slot (-1: empty), which is all the masks need.
"""

from __future__ import annotations

import copy

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

    def plan_write(self, kind: str, positions: torch.Tensor, valid: torch.Tensor, used: int) -> torch.Tensor:
        """Where an encoder pass's tokens go. Full layers: the slot of each new token [B, T] (padding goes to
        the trash slot). Sliding layers: for each of the `capacity` slots, the index of the token it keeps in
        `[cache[:used] ; new tokens]` [B, capacity] — the row's latest tokens, oldest first."""
        cap = self.capacity[kind]
        if kind == FULL:
            return torch.where(valid, positions, torch.full_like(positions, cap))
        old_len = self.lengths[:, None]
        new_len = old_len + valid.sum(dim=1, keepdim=True)
        wanted = new_len - torch.clamp(new_len, max=cap) + torch.arange(cap, device=positions.device)
        old_start = old_len - torch.clamp(old_len, max=cap)
        index = torch.where(wanted < old_len, wanted - old_start, used + wanted - old_len)
        return torch.where(wanted < new_len, index, torch.zeros_like(index))

    def views(self, used: dict[str, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values in slots [0, used[kind]) (views: they see later writes)."""
        return [(k[:, :, :used[kind]], v[:, :, :used[kind]]) for k, v, kind in zip(self.k, self.v, self.kinds)]

    def commit(self, plans: dict[str, torch.Tensor], positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Record the positions held after an encoder pass."""
        n_new = valid.sum(dim=1)
        for kind, plan in plans.items():
            if kind == FULL:
                rows = torch.arange(self.batch, device=plan.device)[:, None].expand_as(plan)
                self.slot_pos[kind][rows, plan] = torch.where(valid, positions, torch.full_like(positions, -1))
                self.slot_pos[kind][:, -1] = -1
            else:
                cap = self.capacity[kind]
                new_len = (self.lengths + n_new)[:, None]
                pos = new_len - torch.clamp(new_len, max=cap) + torch.arange(cap, device=plan.device)
                self.slot_pos[kind][:, :cap] = torch.where(pos < new_len, pos, torch.full_like(pos, -1))
        self.lengths += n_new

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache sharing this one's storage (a batch of the active slots)."""
        view = copy.copy(self)
        view.batch = stop - start
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.slot_pos = {kind: pos[start:stop] for kind, pos in self.slot_pos.items()}
        view.lengths = self.lengths[start:stop]
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (its tokens, their positions, its length) into row `dst`, then empty `src`."""
        held = int(self.lengths[src])
        for i, kind in enumerate(self.kinds):
            n = min(self.capacity[kind], held)
            self.k[i][dst, :, :n] = self.k[i][src, :, :n]
            self.v[i][dst, :, :n] = self.v[i][src, :, :n]
        for pos in self.slot_pos.values():
            pos[dst] = pos[src]
        self.lengths[dst] = held
        self.reset_rows(torch.tensor([src], device=self.device))

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty the given rows (a finished request frees its slot)."""
        for pos in self.slot_pos.values():
            pos[rows] = -1
        self.lengths[rows] = 0


def write_layer(kind: str, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store one layer's new k, v [B, kv_heads, T, D] in its cache buffers by `KVCache.plan_write`'s plan for
    the layer's kind; `keys`/`values` are `[cached slots ; new]`."""
    if kind == FULL:
        rows = torch.arange(plan.shape[0], device=k.device)[:, None].expand_as(plan)
        k_cache[rows, :, plan] = k.transpose(1, 2)
        v_cache[rows, :, plan] = v.transpose(1, 2)
        return
    b, h, _, d = keys.shape
    index = plan[:, None, :, None].expand(b, h, plan.shape[1], d)
    k_cache[:, :, :plan.shape[1]] = keys.gather(2, index)
    v_cache[:, :, :plan.shape[1]] = values.gather(2, index)
