"""Autoregressive decoding through the causal encoder: one token per forward pass, same weights and cache.

The encoder is trained with an AR loss as well, so this is the same-weights baseline that diffusion's
tokens-per-forward is compared against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..config import ConfigError
from ..model.model import DiffusionGemmaModel
from .cache import KVCache
from .generate import GenerationResult, GenerationStats, _right_pad


@torch.inference_mode()
def generate_ar(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                eos_token_ids: Sequence[int], pad_token_id: int | None, temperature: float = 0.0,
                generators: list[torch.Generator] | None = None) -> GenerationResult:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ConfigError("a prompt needs at least one token")
    if longest + max_new_tokens > model.text.max_position_embeddings:
        raise ConfigError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model context "
                          f"of {model.text.max_position_embeddings}")
    t0 = time.perf_counter()
    pad = model.text.pad_token_id if pad_token_id is None else pad_token_id
    device = model.device
    b = len(prompts)
    cache = KVCache(model.text, b, longest + max_new_tokens, 1, model.dtype, device)
    tokens, valid = _right_pad(prompts, pad, device)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out = []
    first = 0.0
    with model.vocab_session():
        for step in range(max_new_tokens):
            hidden = model.encode(tokens, cache, valid)
            last = hidden[torch.arange(b, device=device), valid.sum(dim=1) - 1]
            logits = model.logits(last)
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)]) \
                    if generators else torch.multinomial(probs, 1)[:, 0]
            nxt = nxt.masked_fill(finished, pad)
            out.append(nxt)
            finished |= torch.isin(nxt, eos)
            if step == 0:
                first = time.perf_counter() - t0
            if bool(finished.all()):
                break
            tokens, valid = nxt[:, None], torch.ones(b, 1, dtype=torch.bool, device=device)
    gen = torch.stack(out, dim=1)
    n_tokens = (gen != pad).sum(dim=1).tolist()
    stats = GenerationStats(passes_per_canvas=[[len(out)] for _ in range(b)], decoder_passes=[len(out)] * b,
                            new_tokens=n_tokens, tokens_per_forward=[n / len(out) for n in n_tokens],
                            wall_time_s=time.perf_counter() - t0, first_canvas_s=first)
    return GenerationResult(gen.tolist(), stats)
