"""LoRA through `peft`: adapters on every linear layer, saved apart, merged into a full checkpoint on export.

Targets: attention q/k/v/o projections, the dense MLP's gate/up/down and the self-conditioning MLP's (all plain
`nn.Linear`). The experts are 3-D parameters, not linear modules, and stay frozen, as do the routers, norms and
embeddings. Adapters are stored as peft writes them (`adapter_config.json`, `adapter_model.safetensors`) with
dgemma's parameter names; `base_model_name_or_path` in the config points at the base checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXCLUDED_MODULES = r".*(vision_tower|embed_vision)\..*"  # the text model's layers only: the vision tower stays frozen
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs the peft package: pip install 'dgemma[train]'") from None
    return peft


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, base: str | None = None, seed: int = 0):
    """Wrap the target layers of `model` in place; only the adapter weights stay trainable. Returns the LoraConfig.
    The adapters' random initialisation comes from `seed`, not from (nor disturbing) torch's global generator."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                             target_modules=TARGET_MODULES, exclude_modules=EXCLUDED_MODULES,
                             base_model_name_or_path=base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model)  # also sets model.peft_config
    _adapters_in_fp32(model)
    return config


def _adapters_in_fp32(model: nn.Module) -> None:
    """peft makes the adapters in their base layer's dtype; they train and merge in float32 whatever the frozen
    base's (peft's own layers cast their input to the adapter's dtype and the result back)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.data = p.data.float()


def save_adapter(model: nn.Module, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """`state`: the model's state dict to take the adapter from, where `model.state_dict()` would not hold plain
    tensors (sharded training gathers it first)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(directory))
    adapter = _peft().get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: Path, base: str | None = None) -> None:
    """Load adapter weights saved by `save_adapter` into a model that already has LoRA layers; `base` names the
    model in the error when the adapter does not fit it (layers, or their shapes, differ)."""
    state = _adapter_weights(Path(directory) / ADAPTER_WEIGHTS)
    peft = _peft()
    expected = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    misfit = _misfit(state, expected)
    if misfit:
        trained_on = model.peft_config["default"].base_model_name_or_path
        named = f" {base}" if base else ""
        origin = f" (the adapter was trained on {trained_on})" if trained_on and trained_on != base else ""
        raise ConfigError(f"{directory}: the adapter does not fit the base model{named}: {misfit}{origin}")
    peft.set_peft_model_state_dict(model, state)


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (the adapter's weights)")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ConfigError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _misfit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first adapter tensor (in the model's order) that the model's LoRA layers do not match, described."""
    for key, tensor in expected.items():
        if key not in state:
            return f"the base has {key}, the adapter does not"
        if state[key].shape != tensor.shape:
            return f"{key} is {list(state[key].shape)} in the adapter but {list(tensor.shape)} in the base"
    extra = [key for key in state if key not in expected]
    if extra:
        return f"the adapter has {extra[0]}, the base does not"
    return None


def _adapter_config(directory: Path):
    """The adapter's LoraConfig, read from the directory only (peft would otherwise look the name up on the Hub)."""
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{directory}: no adapter_config.json (not a LoRA checkpoint of `dgemma train --lora`)")
    try:
        fields = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(fields, dict) or fields.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: not a LoRA adapter config (no \"peft_type\": \"LORA\")")
    try:
        return _peft().LoraConfig.from_pretrained(str(directory))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None


def adapter_base(directory: Path) -> str | None:
    """The base model recorded in an adapter directory."""
    return _adapter_config(directory).base_model_name_or_path


def attach_adapter(model: nn.Module, directory: Path, base: str | None = None) -> None:
    """Add the LoRA layers described by an adapter directory and load its weights (`base`: the model's name, for
    errors)."""
    peft = _peft()
    config = _adapter_config(directory)
    peft.inject_adapter_in_model(config, model)
    _adapters_in_fp32(model)
    load_adapter(model, directory, base)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain `nn.Linear` back."""
    lora_layer = _peft().tuners.lora.LoraLayer
    for name, module in list(model.named_modules()):
        if isinstance(module, lora_layer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    del model.peft_config
    return model
