"""Train a BPE tokenizer in the Gemma 4 format (`dgemma tokenizer train --data PATH --vocab-size N --out DIR`).

Layout of the vocabulary (the same as `byte_tokenizer()`, so prompts and special ids do not change):
ids 0..255 are the control tokens of `GEMMA4_SPECIAL_IDS` at their ids (pad 0, eos 1, bos 2, <unk> 3, <|think|> 98,
<|channel> 100, <channel|> 101, <|turn> 105, <turn|> 106, dgemma's <|fill|> 4) and `<unusedN>` elsewhere;
ids 256..511 are the byte-fallback tokens `<0x00>`..`<0xFF>` (any character the merges do not cover); learned
tokens follow from 512. Text is split into
pieces before merging (words with their leading space, single digits, punctuation runs, whitespace runs, so
indentation gets its own tokens), and decoding is lossless.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from importlib.resources import files
from pathlib import Path

from ..config import ConfigError
from ..tokenizer import GEMMA4_SPECIAL_IDS, Tokenizer
from .data import DataError, Record

RESERVED = 512  # control/unused ids plus the 256 byte tokens
MAX_VOCAB = 1 << 20  # 4x Gemma 4's 262,144; the BPE trainer reserves memory for the whole size up front
PIECES = r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _reserved_vocab() -> dict[str, int]:
    names = {i: f"<unused{i}>" for i in range(256)}
    names.update({i: name for name, i in GEMMA4_SPECIAL_IDS.items()})
    vocab = {name: i for i, name in names.items()}
    vocab.update({f"<0x{b:02X}>": 256 + b for b in range(256)})
    return vocab


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(PIECES), behavior="isolated")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Learn `vocab_size - 512` tokens from `texts` and assemble the Gemma 4 layout around them."""
    from tokenizers import AddedToken, decoders, models, trainers
    from tokenizers import Tokenizer as Backend

    if vocab_size <= RESERVED:
        raise ConfigError(f"vocab size must exceed the {RESERVED} reserved ids, got {vocab_size}")
    if vocab_size > MAX_VOCAB:
        raise ConfigError(f"vocab size must be at most {MAX_VOCAB}, got {vocab_size}")
    if min_frequency < 0:
        raise ConfigError(f"min frequency must be >= 0, got {min_frequency}")
    learner = Backend(models.BPE())
    learner.pre_tokenizer = _pre_tokenizer()
    learned = vocab_size - RESERVED
    trainer = trainers.BpeTrainer(vocab_size=learned, min_frequency=min_frequency, show_progress=False,
                                  limit_alphabet=min(1000, learned // 2))
    learner.train_from_iterator(texts, trainer)
    model = json.loads(learner.to_str())["model"]

    vocab = _reserved_vocab()
    for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    specials = sorted((i, name) for name, i in vocab.items() if i < 256)
    backend.add_special_tokens([AddedToken(name, special=True) for _, name in specials])
    return Tokenizer(backend, files("dgemma").joinpath("templates/gemma4_chat.jinja").read_text())


def record_texts(records: Iterable[Record]) -> Iterator[str]:
    """The text of every record: prompt (or chat messages) and target. Raises DataError naming the record's file
    and line for text the tokenizer cannot take (a lone surrogate, from a JSON `\\ud800` escape)."""
    for r in records:
        if isinstance(r.prompt, list):
            texts = [m["content"] for m in r.prompt]
        else:
            texts = [r.prompt] if r.prompt else []
        for text in (*texts, r.target):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{r.source}: text is not valid Unicode: {e.reason} at character {e.start}") from None
            yield text


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """`tokenizer.json`, `chat_template.jinja` and (where `out` has none) `tokenizer_config.json`, as a model
    directory holds them."""
    tokenizer.save(out)
