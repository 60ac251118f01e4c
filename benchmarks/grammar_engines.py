"""Grammar engines compared at Gemma 4's vocabulary size (262,144): llguidance, xgrammar, outlines-core.

For each engine and constraint (a JSON schema with nesting, enums, bounded numbers and a pattern; a regex): the
time to compile the constraint for the vocabulary, the time of one full token mask (the allowed-token bitmask of
the next position) and of one token check-and-advance, along a valid output tokenized with the benchmark
tokenizer (`big_vocab.py`). Prints JSON. Engines that are not installed are reported as such: xgrammar needs
torch and transformers at import time, so it is best measured from a separate environment on PYTHONPATH.

    python benchmarks/grammar_engines.py --json > benchmarks/grammar_engines.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from big_vocab import DEFAULT_CACHE, gemma_sized_tokenizer  # noqa: E402
from common import Parser, machine_info  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "id", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
VALUE = {"name": "Ada Lovelace", "id": "ABC-1234", "age": 36, "score": 0.75, "role": "editor",
         "tags": ["math", "engines", "poetry"], "address": {"city": "London", "zip": "W1"}}
REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01]) [a-z]+( [a-z]+){0,6}\."
REGEX_TEXT = "2024-06-30 the quick brown fox jumps over dogs."


def _ms(seconds: list[float]) -> dict[str, float]:
    return {"mean_ms": 1e3 * statistics.fmean(seconds), "median_ms": 1e3 * statistics.median(seconds),
            "max_ms": 1e3 * max(seconds)}


def bench_llguidance(tok, tokens: list[int], kind: str) -> dict[str, Any]:
    import llguidance
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_id)
    tokenizer_s = time.perf_counter() - t0
    grammar = (llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides={"whitespace_flexible": False})
               if kind == "json" else llguidance.LLMatcher.grammar_from_regex(REGEX))
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    assert not matcher.is_error(), matcher.get_error()
    mask = llt.allocate_token_bitmask(1, tok.vocab_size)
    masks, consumes = [], []
    for t in tokens:
        t0 = time.perf_counter()
        llt.fill_next_token_bitmask(matcher, mask)
        masks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ok = matcher.consume_token(t)
        consumes.append(time.perf_counter() - t0)
        assert ok, matcher.get_error()
    assert matcher.is_accepting()
    return {"tokenizer_setup_s": tokenizer_s, "compile_s": compile_s, "mask": _ms(masks), "consume": _ms(consumes)}


def bench_xgrammar(tok, tokens: list[int], kind: str) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    vocab = [tok.decode([i]).encode() for i in range(tok.vocab_size)]
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_id])
    compiler = xgr.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = (compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                          separators=(",", ":")) if kind == "json"
                else compiler.compile_regex(REGEX))
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    masks, consumes = [], []
    for t in tokens:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        masks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ok = matcher.accept_token(t)
        consumes.append(time.perf_counter() - t0)
        assert ok
    assert matcher.is_terminated() or matcher.accept_token(tok.eos_id)
    del torch
    return {"tokenizer_setup_s": tokenizer_s, "compile_s": compile_s, "mask": _ms(masks), "consume": _ms(consumes)}


def bench_outlines(tok, tokens: list[int], kind: str, budget_s: float) -> dict[str, Any]:
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    pieces: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if i != tok.eos_id:
            pieces.setdefault(tok.decode([i]).encode(), []).append(i)
    t0 = time.perf_counter()
    vocabulary = Vocabulary(tok.eos_id, pieces)
    tokenizer_s = time.perf_counter() - t0
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="") if kind == "json" else REGEX
    t0 = time.perf_counter()
    index = Index(regex, vocabulary)  # a full DFA x vocabulary product, built up front
    compile_s = time.perf_counter() - t0
    guide = Guide(index)
    mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    masks, consumes = [], []
    for t in tokens:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        masks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        guide.advance(t)
        consumes.append(time.perf_counter() - t0)
    return {"tokenizer_setup_s": tokenizer_s, "compile_s": compile_s, "mask": _ms(masks), "consume": _ms(consumes),
            "note": f"compile budget {budget_s:g} s not enforced in-process"}


ENGINES = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines-core": bench_outlines}


def main() -> None:
    p = Parser(prog="grammar_engines.py", description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer-cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    args = p.parse_args()
    tok = gemma_sized_tokenizer(args.tokenizer_cache)
    cases = {"json": tok.encode(json.dumps(VALUE, separators=(",", ":")), add_bos=False),
             "regex": tok.encode(REGEX_TEXT, add_bos=False)}
    out: dict[str, Any] = {"machine": machine_info(), "vocab_size": tok.vocab_size,
                           "tokens": {k: len(v) for k, v in cases.items()}, "engines": {}}
    for name in args.engines.split(","):
        results: dict[str, Any] = {}
        for kind, tokens in cases.items():
            try:
                fn = ENGINES[name]
                results[kind] = fn(tok, tokens, kind, 600.0) if name == "outlines-core" else fn(tok, tokens, kind)
            except ImportError as e:
                results = {"error": f"not installed: {e}"}
                break
            except Exception as e:  # an engine that fails a case is reported, the others still run
                results[kind] = {"error": f"{type(e).__name__}: {e}"}
        out["engines"][name] = results
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
