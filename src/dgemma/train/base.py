"""The model and tokenizer a run starts from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..api import DiffusionGemma
from ..config import ConfigError, DiffusionGemmaConfig, GenerationConfig, preset
from ..model.model import DiffusionGemmaModel
from ..shipped import resolve
from ..tokenizer import Tokenizer, byte_tokenizer


def load_base(model: str, config_json: str | None = None, tokenizer_dir: str | None = None,
              seed: int = 0, dtype: torch.dtype | str = torch.float32,
              device: str | torch.device = "cpu") -> DiffusionGemma:
    """A checkpoint directory, or random weights for a preset name or a `config.json` file, in `dtype` on
    `device` (a checkpoint's tensors are placed there as they are read).

    `tokenizer_dir` (a folder with tokenizer.json) replaces the model's tokenizer; a randomly initialised model
    takes the tokenizer's vocabulary size, a checkpoint must already have room for it.

    On the "meta" device: the model's structure, config and tokenizer without its weights (no memory, nothing
    read but the config), which sharded training fills shard by shard.
    """
    tokenizer = Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir else None
    source = None if config_json is not None else _source(model)
    meta = torch.device(device).type == "meta"
    if source is None:
        config = _config(model, config_json)
        if tokenizer is not None:
            text = dataclasses.replace(config.text_config, vocab_size=tokenizer.vocab_size)
            config = dataclasses.replace(config, text_config=text)
        base = (_shell(config, GenerationConfig.for_model(config), byte_tokenizer() if _byte_vocab(config) else None,
                       dtype) if meta else DiffusionGemma.from_config(config, seed=seed, dtype=dtype, device=device))
    elif meta:
        config = DiffusionGemmaConfig.load(source)
        has_tokenizer = (source / "tokenizer.json").is_file()
        base = _shell(config, GenerationConfig.load(source, config), Tokenizer.from_dir(source) if has_tokenizer
                      else None, dtype)
    else:
        base = DiffusionGemma.from_pretrained(source, dtype=dtype, device=device)
    if tokenizer is not None:
        if tokenizer.vocab_size > base.config.text_config.vocab_size:
            raise ConfigError(f"tokenizer {tokenizer_dir} has {tokenizer.vocab_size} tokens but the model's "
                              f"vocabulary is {base.config.text_config.vocab_size}")
        base.tokenizer = tokenizer
    if base.tokenizer is None:
        raise ConfigError(f"model {model!r} comes without a tokenizer: pass --tokenizer DIR")
    return base


def base_config(model: str, config_json: str | None = None) -> DiffusionGemmaConfig:
    """The config of what `load_base` would load, read without its weights."""
    source = None if config_json is not None else _source(model)
    return _config(model, config_json) if source is None else DiffusionGemmaConfig.load(source)


def _shell(config: DiffusionGemmaConfig, generation: GenerationConfig, tokenizer: Tokenizer | None,
           dtype: torch.dtype | str) -> DiffusionGemma:
    with torch.device("meta"):
        model = DiffusionGemmaModel(config).to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return DiffusionGemma(model.requires_grad_(False).eval(), generation, tokenizer)


def _byte_vocab(config: DiffusionGemmaConfig) -> bool:
    """Whether `DiffusionGemma.from_config` gives this config the byte-level tokenizer (room for its ids)."""
    return config.text_config.vocab_size >= 512


def _source(model: str) -> Path | None:
    """The checkpoint directory `model` names (a path or a shipped model), or None for a preset."""
    try:
        kind, source = resolve(model)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return source if kind == "directory" else None


def _config(model: str, config_json: str | None) -> DiffusionGemmaConfig:
    if config_json is None:
        return preset(model)
    path = Path(config_json)
    try:
        return DiffusionGemmaConfig.from_hf_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
