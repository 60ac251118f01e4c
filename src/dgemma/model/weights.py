"""Checkpoint I/O in the Hugging Face layout (safetensors, single file or sharded with an index).

HF names are converted at load time (the vision tower keeps its own: `vision_tower.*` and `embed_vision.*` here
are `model.encoder.vision_tower.*` and `model.encoder.embed_vision.*` there). The encoder and decoder share
their weights, so a checkpoint may store a tied tensor under the encoder name, the decoder name, or both (and the embedding as `lm_head.weight`
too); the first one found is read, and of the others only the shape is checked (safetensors header): their
values are not read, so not compared (reading them would double a large checkpoint's load time). The model is
built on the meta device and each tensor is placed as it is read, so peak memory is about one copy of the weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import DiffusionGemmaConfig
from .model import DiffusionGemmaModel

ENC = "model.encoder.language_model."
DEC = "model.decoder."
VISION = "model.encoder."  # the vision tower and its projection: `vision_tower.*`, `embed_vision.*` under it
VISION_PREFIXES = ("vision_tower.", "embed_vision.")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unexpected, mis-shaped or unreadable tensors."""


def hf_sources(name: str) -> list[str]:
    """HF checkpoint names that can hold dgemma parameter `name`, in order of preference."""
    if name == "embed_tokens.weight":
        return [DEC + name, ENC + name, "lm_head.weight"]
    if name == "norm.weight":
        return [DEC + name, ENC + name]
    if name.startswith(VISION_PREFIXES):
        return [VISION + name]
    if name.startswith("self_conditioning."):
        return [DEC + name.replace(".mlp.", ".")]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        raise KeyError(name)
    i, rest = m.groups()
    if rest == "layer_scalar":
        return [f"{ENC}layers.{i}.layer_scalar", f"{DEC}layers.{i}.layer_scalar"]
    if rest == "decoder_layer_scalar":
        return [f"{DEC}layers.{i}.layer_scalar", f"{ENC}layers.{i}.layer_scalar"]
    return [f"{DEC}layers.{i}.{rest}", f"{ENC}layers.{i}.{rest}"]


def hf_save_name(name: str) -> str:
    """The name transformers itself writes: tied tensors under the decoder, encoder scalars apart."""
    m = re.fullmatch(r"layers\.(\d+)\.layer_scalar", name)
    return f"{ENC}{name}" if m else hf_sources(name)[0]


class _Reader:
    """Lazy access to the tensors of one checkpoint directory."""

    def __init__(self, directory: Path):
        index = directory / INDEX
        if index.is_file():
            try:
                data = json.loads(index.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: not a safetensors index (expected a JSON object whose 'weight_map' "
                                      f"maps tensor names to shard file names)")
            self.where = {name: directory / file for name, file in weight_map.items()}
        elif (directory / SINGLE).is_file():
            self.where = {}
            for name in self._open(directory / SINGLE).keys():
                self.where[name] = directory / SINGLE
        else:
            raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}")
        self._files: dict[Path, object] = {}
        self._keys: dict[Path, set[str]] = {}

    def _open(self, path: Path):
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in the index is " + ("not a file" if path.exists() else
                                                                                "missing"))
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e

    def _file(self, name: str):
        path = self.where[name]
        if path not in self._files:
            self._files[path] = self._open(path)
            self._keys[path] = set(self._files[path].keys())
        if name not in self._keys[path]:
            raise CheckpointError(f"{path}: has no tensor {name!r}, which {INDEX} maps to this shard")
        return self._files[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._file(name).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.where[name]}: cannot read tensor {name!r} ({e})") from e


def load_weights(directory: str | Path, config: DiffusionGemmaConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> DiffusionGemmaModel:
    directory = Path(directory)
    reader = _Reader(directory)
    with torch.device("meta"):
        model = DiffusionGemmaModel(config)
    expected = dict(model.state_dict())
    used: set[str] = set()
    missing, mismatched = [], []
    for name, meta in expected.items():
        sources = [s for s in hf_sources(name) if s in reader.where]
        used.update(sources)
        if not sources:
            missing.append(hf_sources(name)[0])
            continue
        shape = reader.shape(sources[0])
        # the other copies of a tied tensor: their shapes only (their values are not read)
        for copy in sources[1:]:
            if reader.shape(copy) != shape:
                mismatched.append(f"{copy}: checkpoint {list(reader.shape(copy))}, but its tied copy {sources[0]} is "
                                  f"{list(shape)}")
        if shape != tuple(meta.shape):
            mismatched.append(f"{sources[0]}: checkpoint {list(shape)}, model expects {list(meta.shape)}")
            continue
        if not (missing or mismatched):  # once the load fails, only the rest of its problems are looked for
            _place(model, name, reader.get(sources[0]).to(device=device, dtype=dtype))
    # a config without vision_config reads text only: a tower the checkpoint has anyway is left unread
    vision = tuple(VISION + prefix for prefix in VISION_PREFIXES)
    skipped = [n for n in reader.where if config.vision_config is None and n.startswith(vision)]
    unexpected = sorted(set(reader.where) - used - set(skipped))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if mismatched:
        problems.append("mis-shaped tensors: " + "; ".join(mismatched[:8]))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(f"{directory}: checkpoint does not match config.json: " + " | ".join(problems))
    model.init_rope()
    return model.eval().requires_grad_(False)


def _place(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def hf_state_dict(model: DiffusionGemmaModel) -> dict[str, torch.Tensor]:
    return {hf_save_name(name): t for name, t in model.state_dict().items()}


def save_weights(model: DiffusionGemmaModel, directory: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` when larger than one shard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, tensor in hf_state_dict(model).items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
