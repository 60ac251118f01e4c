"""The models `dgemma bench` times: a preset with random weights built on the device, and transformers'
implementation over the very same tensors."""

from __future__ import annotations

import torch

from ..api import DiffusionGemma, is_unit_initialised
from ..config import DiffusionGemmaConfig, GenerationConfig
from ..model.model import DiffusionGemmaModel


def random_model(config: DiffusionGemmaConfig, device: str, dtype: torch.dtype, seed: int = 0) -> DiffusionGemma:
    """Random weights built directly on `device` in `dtype` (no host copy): normal(0, initializer_range),
    norms and scales one. For timing; the values differ from `DiffusionGemma.from_config`'s CPU draw."""
    with torch.device("meta"):
        model = DiffusionGemmaModel(config)
    model = model.to(dtype).to_empty(device=device)  # allocate in the target dtype only
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_unit_initialised(name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)
    model.init_rope()
    model.requires_grad_(False).eval()
    return DiffusionGemma(model, GenerationConfig.for_model(config), None)


def transformers_sharing(dg: DiffusionGemma):
    """transformers' DiffusionGemmaForBlockDiffusion over the very tensors of `dg` (built on the meta device,
    the weights assigned, not copied; the vision tower, unused for text, is left unallocated)."""
    import tempfile

    import transformers
    from transformers import AutoConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as hfm

    from ..model.weights import hf_sources

    transformers.logging.set_verbosity_error()
    device, dtype = dg.device, dg.model.dtype
    with tempfile.TemporaryDirectory() as d:
        dg.config.save(d)
        cfg = AutoConfig.from_pretrained(d)
    cfg.dtype = dtype
    with torch.device("meta"):
        hf = DiffusionGemmaForBlockDiffusion(cfg)
    sources: dict[str, torch.Tensor] = {}
    for name, t in dg.model.state_dict().items():
        for src in hf_sources(name):
            sources.setdefault(src, t)
    sources.setdefault("lm_head.weight", dg.model.embed_tokens.weight)
    wanted = hf.state_dict().keys()
    hf.load_state_dict({k: sources[k] for k in wanted if k in sources}, strict=False, assign=True)
    missing = [k for k in wanted if k not in sources and "vision" not in k]
    if missing:
        raise RuntimeError(f"no dgemma tensor for transformers parameters {missing[:5]}")
    text_cfg = cfg.text_config if hasattr(cfg, "text_config") else cfg
    for name, mod in list(hf.named_modules()):
        if isinstance(mod, hfm.DiffusionGemmaTextRotaryEmbedding):
            parent_name, _, attr = name.rpartition(".")
            setattr(hf.get_submodule(parent_name), attr, hfm.DiffusionGemmaTextRotaryEmbedding(text_cfg, device=device))
        if name.endswith("embed_tokens") and hasattr(mod, "embed_scale"):
            mod.embed_scale = torch.tensor(text_cfg.hidden_size ** 0.5, dtype=dtype, device=device)
    for name, mod in hf.named_modules():  # the unused vision tower: anything left on meta gets empty storage
        if "vision" in name and any(p.is_meta for p in mod.parameters(recurse=False)):
            mod.to_empty(device=device, recurse=False)
    hf.eval()
    return hf
