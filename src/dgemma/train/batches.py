"""Examples -> fixed-length rows -> global batches.

Rows are either packed (examples concatenated, each ending in EOS, cut every `seq_len` tokens) or one example
per row, right-padded; either way a row marks where each of its examples ends (`ends`). A `BatchStream` serves
global batches in a seeded random order, epoch after epoch; its position is part of a checkpoint so a resumed
run reads exactly the batches it would have read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import DataError, Example


def derive_seed(*parts: int) -> int:
    """An independent seed for each tuple of integers (run seed, purpose, step ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclass
class Batch:
    """Rows of tokens; pad after `lengths`. `loss_mask` marks the tokens the model is trained to produce, `ends`
    the last token of each example (packed rows hold several; default: each row's last token)."""

    tokens: torch.Tensor  # [B, L] long
    loss_mask: torch.Tensor  # [B, L] bool
    lengths: torch.Tensor  # [B] long
    ends: torch.Tensor | None = None  # [B, L] bool

    def __post_init__(self) -> None:
        if self.ends is None:
            pos = torch.arange(self.tokens.shape[1], device=self.tokens.device)
            self.ends = pos == (self.lengths[:, None] - 1)

    def rows(self, index: torch.Tensor) -> "Batch":
        return Batch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())


def _mask(example: Example) -> list[bool]:
    return [False] * example.prompt_len + [True] * (len(example.tokens) - example.prompt_len)


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> Batch:
    """Concatenate every example and cut the stream into rows of `seq_len`; rows with nothing to learn are dropped."""
    if not examples:
        return pad_each(examples, seq_len, pad_id)
    tokens = torch.tensor([t for e in examples for t in e.tokens], dtype=torch.long)
    mask = torch.tensor([m for e in examples for m in _mask(e)], dtype=torch.bool)
    ends = torch.tensor([i == len(e.tokens) - 1 for e in examples for i in range(len(e.tokens))], dtype=torch.bool)
    n = tokens.numel()
    rows = -(-n // seq_len)
    padded = torch.full((rows * seq_len,), pad_id, dtype=torch.long)
    padded[:n] = tokens
    padded_mask = torch.zeros(rows * seq_len, dtype=torch.bool)
    padded_mask[:n] = mask
    padded_ends = torch.zeros(rows * seq_len, dtype=torch.bool)
    padded_ends[:n] = ends
    lengths = torch.full((rows,), seq_len, dtype=torch.long)
    lengths[-1] = n - (rows - 1) * seq_len
    batch = Batch(padded.view(rows, seq_len), padded_mask.view(rows, seq_len), lengths, padded_ends.view(rows, seq_len))
    return batch.rows(batch.loss_mask.any(dim=1))


def pad_each(examples: Sequence[Example], seq_len: int, pad_id: int) -> Batch:
    """One example per row, right-padded to `seq_len`; a longer example is a DataError."""
    tokens = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), seq_len), dtype=torch.bool)
    for i, e in enumerate(examples):
        if len(e.tokens) > seq_len:
            raise DataError(f"{e.source}: example is {len(e.tokens)} tokens, longer than --seq-len {seq_len} "
                            "(raise --seq-len, or pack examples)")
        tokens[i, :len(e.tokens)] = torch.tensor(e.tokens)
        mask[i, :len(e.tokens)] = torch.tensor(_mask(e))
    return Batch(tokens, mask, torch.tensor([len(e.tokens) for e in examples], dtype=torch.long))


def make_rows(examples: Sequence[Example], seq_len: int, pad_id: int, packed: bool) -> Batch:
    return (pack if packed else pad_each)(examples, seq_len, pad_id)


class BatchStream:
    """Global batches of `batch_size` rows: each epoch is a fresh permutation drawn from (seed, epoch)."""

    def __init__(self, rows: Batch, batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        if len(rows) == 0:
            raise DataError("no training rows")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.position = epoch, position
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            self._perm = (self.epoch, torch.randperm(len(self.rows), generator=g))
        return self._perm[1]

    def next(self) -> Batch:
        picked: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            take = self._order()[self.position:self.position + need]
            picked.append(take)
            need -= take.numel()
            self.position += take.numel()
            if self.position == len(self.rows):
                self.epoch, self.position = self.epoch + 1, 0
        return self.rows.rows(torch.cat(picked))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}
