"""Held-out per-token loss: the encoder's AR cross-entropy, and the decoder's denoising cross-entropy at fixed
noise levels (the last canvas of each chunk corrupted with keep-probability 1 - t, no self-conditioning)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import DiffusionGemma
from .tasks import HELDOUT_STDLIB, stdlib_dir


def heldout_chunks(model: DiffusionGemma, length: int, max_chunks: int) -> list[list[int]]:
    ids: list[int] = []
    for name in HELDOUT_STDLIB:
        path = stdlib_dir() / name
        if path.is_file():
            ids += model.tokenizer.encode(path.read_text(encoding="utf-8")) + [model.tokenizer.eos_id]
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:max_chunks]


@torch.inference_mode()
def heldout_loss(model: DiffusionGemma, length: int = 512, max_chunks: int = 32,
                 noise_levels: tuple[float, ...] = (0.25, 0.5, 0.75), seed: int = 0) -> dict[str, float]:
    m, c = model.model, model.config.canvas_length
    g = torch.Generator().manual_seed(seed)
    ar, diff, n_ar, n_diff = 0.0, {t: 0.0 for t in noise_levels}, 0, 0
    for chunk in heldout_chunks(model, length, max_chunks):
        tokens = torch.tensor([chunk], device=model.device)
        hidden, context = m.encode_sequence(tokens)
        ar += F.cross_entropy(m.logits(hidden[0, :-1]), tokens[0, 1:], reduction="sum").item()
        n_ar += len(chunk) - 1
        start = torch.tensor([length - c], device=model.device)
        clean = tokens[:, -c:]
        for t in noise_levels:
            keep = (torch.rand(clean.shape, generator=g) >= t).to(model.device)
            noise = torch.randint(0, m.text.vocab_size, clean.shape, generator=g).to(model.device)
            noisy = torch.where(keep, clean, noise)
            logits = m.denoise(noisy, context.at(start))
            diff[t] += F.cross_entropy(logits[0], clean[0], reduction="sum").item()
        n_diff += c
    if n_ar == 0:
        raise ValueError(f"no held-out text found under {stdlib_dir()}")
    return {"ar_loss": ar / n_ar, **{f"diffusion_loss_t{t}": v / n_diff for t, v in diff.items()}}
