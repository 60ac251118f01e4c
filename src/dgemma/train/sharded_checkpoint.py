"""Checkpoints of sharded training (`--fsdp`), through `torch.distributed.checkpoint` (DCP).

    OUT/checkpoint-STEP/
        shards/                   DCP: .metadata and one file per process, each written by its process
        trainer_state.json        as in every checkpoint (step, data position, settings)
        config.json, generation_config.json, tokenizer files   the model's, for `dgemma train export`
        adapter_config.json, adapter_model.safetensors         --lora: the adapter as peft writes it

The shards hold the model's weights (with LoRA the adapters only: the frozen base comes from --model again)
and AdamW's state, both under parameter names, so a run resumes at any number of processes: DCP reads each
process's new share out of the files written by the old ones. `export` turns the shards into the usual
Hugging Face layout in one process. As with the other checkpoints, the directory is written under a temporary
name and renamed when every process has finished.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..api import DiffusionGemma
from ..config import WEIGHT_DTYPES, ConfigError, DiffusionGemmaConfig, GenerationConfig
from ..model.model import DiffusionGemmaModel
from ..tokenizer import Tokenizer
from .checkpoint import STATE_FILE, TrainerState
from .distributed import Distributed
from .lora import save_adapter
from .objective import TrainingStep

SHARDS_DIR = "shards"
_PREFIX = "model."  # the names of the model's tensors within the TrainingStep the shards were taken from


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARDS_DIR).is_dir()


def _options(lora: bool, **kw: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=lora, **kw)  # LoRA: the adapters; the base is not saved again


def save_sharded(out: Path, model: DiffusionGemma, step: TrainingStep, optimizer: torch.optim.Optimizer,
                 state: TrainerState, lora: bool, dist: Distributed) -> Path:
    """Every process writes its shards; the main process the rest. Collective: every process calls it."""
    final = out / f"checkpoint-{state.step}"
    partial = out / f"{final.name}.partial"
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    weights, optim = get_state_dict(step, optimizer, options=_options(lora))
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=partial / SHARDS_DIR)
    adapter = None
    if lora:  # small: gathered whole on the main process for the peft files `train merge` reads
        adapter = get_model_state_dict(step, options=_options(lora, full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        model.config.save(partial)
        model.generation_config.save(partial)
        model.save_tokenizer(partial)
        if adapter is not None:
            save_adapter(model.model, partial, {k.removeprefix(_PREFIX): v for k, v in adapter.items()})
        (partial / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    dist.barrier()
    return final


def check_sharded(checkpoint: Path, config: DiffusionGemmaConfig | None = None) -> None:
    """Refuse a checkpoint that is not a complete sharded one, or (with `config`) was saved for another model."""
    shards = checkpoint / SHARDS_DIR
    if not shards.is_dir():
        raise ConfigError(f"{checkpoint}: no {SHARDS_DIR}/ (not a checkpoint of `dgemma train --fsdp`)")
    try:
        metadata = FileSystemReader(str(shards)).read_metadata()
    except FileNotFoundError:
        raise ConfigError(f"{shards}: no .metadata, the index of the shards (an incomplete checkpoint)") from None
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    missing = [f for f in files if not (shards / f).is_file()]
    if missing:
        raise ConfigError(f"{shards}: shard file {', '.join(missing)} is missing (the checkpoint has {len(files)}, "
                          "one per process that saved it): restore it, or resume from an earlier checkpoint")
    if config is not None:
        saved = DiffusionGemmaConfig.load(checkpoint).to_hf_dict()
        now = config.to_hf_dict()
        if saved != now:
            saved_text, now_text = saved["text_config"], now["text_config"]
            diff = next((f"{k} {saved_text.get(k)!r} there, {now_text.get(k)!r} here" for k in sorted(
                {*saved_text, *now_text}) if saved_text.get(k) != now_text.get(k)), None)
            diff = diff or next(f"{k} {saved.get(k)!r} there, {now.get(k)!r} here" for k in sorted({*saved, *now})
                                if saved.get(k) != now.get(k))
            raise ConfigError(f"{checkpoint}: saved for another model config ({diff}): resume with the model it "
                              "was trained from")


def load_sharded(checkpoint: Path, model: DiffusionGemma, step: TrainingStep, optimizer: torch.optim.Optimizer,
                 lora: bool) -> None:
    """Load the weights and optimizer state of a sharded checkpoint into a sharded step, at any number of
    processes. Collective."""
    check_sharded(checkpoint, model.config)
    weights, optim = get_state_dict(step, optimizer, options=_options(lora))
    state = {"model": weights, "optimizer": optim}
    _dcp_load(state, checkpoint / SHARDS_DIR)
    # LoRA: the frozen base is not in the shards (every adapter is: DCP refuses a key it cannot find)
    set_state_dict(step, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options(lora, strict=not lora))


def _dcp_load(state: dict, shards: Path, **kw: bool) -> None:
    try:
        dcp.load(state, checkpoint_id=shards, **kw)
    except CheckpointException as e:  # a BaseException: per process, what went wrong
        failures = "; ".join(f"process {rank}: {type(exc).__name__}: {exc}"
                             for rank, (exc, _) in sorted(e.failures.items()))
        raise ConfigError(f"{shards}: cannot be read ({failures})") from None


def export(checkpoint: Path, out: Path, dtype: str = "float32") -> Path:
    """Write the weights of a sharded checkpoint in the Hugging Face layout (what `dgemma generate`,
    transformers and vLLM load), in one process. Returns `out`."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_config.json").is_file():
        raise ConfigError(f"{checkpoint}: a LoRA checkpoint; `dgemma train merge {checkpoint} --out DIR` writes the "
                          "base model with the adapter merged in")
    if not is_sharded(checkpoint) and (checkpoint / "config.json").is_file():
        raise ConfigError(f"{checkpoint}: not a sharded checkpoint; it is in the Hugging Face layout already")
    check_sharded(checkpoint)
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    config = DiffusionGemmaConfig.load(checkpoint)
    with torch.device("meta"):
        model = DiffusionGemmaModel(config)
    model.to_empty(device="cpu")
    model.init_rope()
    with warnings.catch_warnings():  # one process on purpose, which DCP warns about
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        _dcp_load({"model": {_PREFIX + k: v for k, v in model.state_dict().items()}}, checkpoint / SHARDS_DIR,
                  no_dist=True)
    model.to(getattr(torch, dtype)).requires_grad_(False).eval()
    tokenizer = Tokenizer.from_dir(checkpoint) if (checkpoint / "tokenizer.json").is_file() else None
    DiffusionGemma(model, GenerationConfig.load(checkpoint, config), tokenizer).save_pretrained(out)
    return Path(out)
