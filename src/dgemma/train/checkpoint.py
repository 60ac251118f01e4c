"""Checkpoints: `OUT/checkpoint-STEP/` holds the model in the Hugging Face layout (or the LoRA adapter),
`optimizer.pt` and `trainer_state.json` (step, data position, the run's settings).

No random-number state is stored: every random draw of a step comes from a generator seeded by (seed, step),
so the step number is enough to resume exactly. A checkpoint is written under a temporary name and renamed
when complete, so an interrupted save never leaves a checkpoint that looks usable.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import DiffusionGemma
from .lora import save_adapter

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_NAME = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # rows of the current epoch already read
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, checkpoint: Path) -> "TrainerState":
        return cls(**json.loads((checkpoint / STATE_FILE).read_text()))


def last_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step in `out`, if any."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*")
             if (m := _NAME.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def save_checkpoint(out: Path, model: DiffusionGemma, optimizer: torch.optim.Optimizer, state: TrainerState,
                    lora: bool) -> Path:
    final = out / f"checkpoint-{state.step}"
    partial = out / f"{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    if lora:
        save_adapter(model.model, partial)
        model.save_tokenizer(partial)  # the run's tokenizer, which `train merge` gives the merged model
    else:
        model.save_pretrained(partial)
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
    (partial / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final
