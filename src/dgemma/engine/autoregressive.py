"""Autoregressive decoding through the causal encoder: one token per forward pass, same weights and cache.

The encoder is trained with an AR loss as well, so this is the same-weights baseline that diffusion's
tokens-per-forward is compared against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..config import TEMPERATURE_RANGE, ConfigError
from ..model.kv_cache import KVCache
from ..model.model import DiffusionGemmaModel
from .generate import GenerationResult, GenerationStats, _right_pad, check_tokens, count_new_tokens


@torch.inference_mode()
def generate_ar(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                eos_token_ids: Sequence[int], pad_token_id: int | None, temperature: float = 0.0,
                generators: list[torch.Generator] | None = None) -> GenerationResult:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    low, high = TEMPERATURE_RANGE
    if not (temperature == 0 or low <= temperature <= high):  # NaN fails too
        raise ConfigError(f"temperature must be 0 (greedy) or in [{low:g}, {high:g}], got {temperature!r}")
    check_tokens(model, prompts, eos_token_ids, pad_token_id)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.text.max_position_embeddings:
        raise ConfigError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model context "
                          f"of {model.text.max_position_embeddings}")
    t0 = time.perf_counter()
    # what follows a row's EOS: the pad id, else (as transformers' AR generate does) the first EOS id
    pad = next((t for t in (pad_token_id, model.text.pad_token_id, *eos_token_ids) if t is not None), 0)
    device = model.device
    b = len(prompts)
    cache = KVCache(model.text, b, longest + max_new_tokens, 1, model.dtype, device)
    tokens, valid = _right_pad(prompts, pad, device)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    passes = torch.zeros(b, dtype=torch.long, device=device)  # per row: the forwards until its EOS
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
            passes += ~finished
            nxt = nxt.masked_fill(finished, pad)
            out.append(nxt)
            finished |= torch.isin(nxt, eos)
            if step == 0:
                first = time.perf_counter() - t0
            if bool(finished.all()):
                break
            tokens, valid = nxt[:, None], torch.ones(b, 1, dtype=torch.bool, device=device)
    gen = torch.stack(out, dim=1)
    n_tokens = count_new_tokens(gen, pad)
    passes_per_row = passes.tolist()
    stats = GenerationStats(passes_per_canvas=[[n] for n in passes_per_row], decoder_passes=passes_per_row,
                            new_tokens=n_tokens, tokens_per_forward=[n / p for n, p in zip(n_tokens, passes_per_row)],
                            wall_time_s=time.perf_counter() - t0, first_canvas_s=first)
    return GenerationResult(gen.tolist(), stats)
