"""A tokenizer the size of Gemma 4's (262,144 ids), built offline for the grammar benchmarks.

Gemma 4's vocabulary cannot be downloaded here, so a BPE in the same layout (control tokens at their ids, byte
fallback, learned tokens from 512: `dgemma.train.tokenizer.train_tokenizer`) is trained on local text: the Python
sources of the installed packages. It is cached, since training takes a few minutes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from dgemma.tokenizer import Tokenizer

GEMMA4_VOCAB = 262_144
DEFAULT_CACHE = Path("/tmp/dgemma-bench-vocab-262144")


def _local_text(limit_bytes: int) -> Iterator[str]:
    """Python sources of the installed packages, up to `limit_bytes` in all."""
    root = Path(sys.prefix) / "lib"
    seen = 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        seen += len(text)
        yield text
        if seen >= limit_bytes:
            return


def gemma_sized_tokenizer(cache: Path = DEFAULT_CACHE, text_bytes: int = 120_000_000) -> Tokenizer:
    """The cached 262,144-token tokenizer, trained first if the cache has none. Padded with `<unusedN>` ids if the
    text does not yield enough merges, so the vocabulary is always exactly Gemma 4's size."""
    if (cache / "tokenizer.json").is_file():
        return Tokenizer.from_dir(cache)
    from tokenizers import AddedToken

    from dgemma.train.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(_local_text(text_bytes), GEMMA4_VOCAB, min_frequency=1)
    missing = GEMMA4_VOCAB - tok.vocab_size
    if missing > 0:
        tok.backend.add_tokens([AddedToken(f"<filler{i}>", special=True) for i in range(missing)])
    save_tokenizer(tok, cache)
    return Tokenizer.from_dir(cache)


if __name__ == "__main__":
    t = gemma_sized_tokenizer()
    print(t.vocab_size)
