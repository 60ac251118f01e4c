"""What constrained output must match, compiled by the grammar engine (llguidance).

A `Constraint` is exactly one of: a JSON schema, "any JSON object", a regular expression, a choice of strings, or a
grammar in llguidance's Lark dialect. `GrammarCompiler` turns one into an llguidance matcher over a tokenizer's
vocabulary; it checks the constraint first and refuses, with a message naming the problem, what is invalid,
unsupported or too large. llguidance was chosen by measurement (benchmarks/grammar_engines.py): no dependencies,
~1 ms to compile a schema, token masks of a 262,144-token vocabulary in ~1 ms on average.

JSON is compact (no whitespace between tokens: separators "," and ":"), so a model cannot fill its canvas with
blank space inside a value.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .formats import schema_with_format_patterns

MAX_SOURCE_CHARS = 64 * 1024  # a schema, regex, choice list or grammar larger than this is refused
MAX_NESTING = 32  # JSON schema nesting (objects and lists inside each other) and regex/grammar bracket depth
MAX_CHOICES = 1024
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# the engine's own limits on grammar size and work, below its defaults: compiling any accepted grammar stays bounded
_ENGINE_LIMITS = dict(max_grammar_size=200_000, initial_lexer_fuel=500_000, max_lexer_states=100_000)


class ConstraintError(ConfigError):
    """A constraint that cannot be used: invalid, unsupported or too large (the message says which)."""


@dataclass(frozen=True)
class Constraint:
    """What the generated text must match; set exactly one field.

    json_schema: a JSON Schema (dict); json_object: any JSON object; regex: the whole output matches it (Rust regex
    syntax); choice: the output is one of these strings; grammar: llguidance's Lark dialect
    (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md)."""

    json_schema: dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, tuple):
            if isinstance(self.choice, str) or not hasattr(self.choice, "__iter__"):
                raise ConstraintError("choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json_schema", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ConstraintError("a constraint takes exactly one of json_schema, json_object, regex, choice, grammar"
                                  + (f"; got {', '.join(given)}" if given else ""))

    @property
    def kind(self) -> str:
        return next(k for k in ("json_schema", "regex", "choice", "grammar") if getattr(self, k) is not None) \
            if not self.json_object else "json_object"

    def source(self) -> str:
        """The llguidance grammar, checked by the engine without a vocabulary (raises `ConstraintError`)."""
        import llguidance

        if self.json_object:
            source = _json_grammar({"type": "object"})
        elif self.json_schema is not None:
            source = _json_grammar(_checked_schema(self.json_schema))
        elif self.regex is not None:
            source = _regex_grammar(self.regex)
        elif self.choice is not None:
            source = _choice_grammar(self.choice)
        else:
            source = _lark_grammar(self.grammar)
        error = llguidance.LLMatcher.validate_grammar(source, None, limits=llguidance.LLParserLimits(**_ENGINE_LIMITS))
        if error and not error.startswith("WARNING"):
            raise ConstraintError(f"{self.kind.replace('_', ' ')}: {_engine_message(error)}")
        return source


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (lists and objects), stopping once past the limit."""
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_NESTING:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _check_size(what: str, text: str) -> None:
    if len(text) > MAX_SOURCE_CHARS:
        raise ConstraintError(f"the {what} has {len(text)} characters; at most {MAX_SOURCE_CHARS} are allowed")


def _checked_schema(schema: Any) -> dict:
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise ConstraintError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"json_schema is not JSON: {e}") from None
    _check_size("JSON schema", text)
    if _depth(schema) > MAX_NESTING:
        raise ConstraintError(f"the JSON schema is nested more than {MAX_NESTING} levels deep")
    from jsonschema import SchemaError, validators

    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ConstraintError(f"invalid JSON schema{' at ' + where if where else ''}: {e.message}") from None
    return schema


def _json_grammar(schema: dict) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema_with_format_patterns(schema), overrides=_JSON_OPTIONS)


def _regex_grammar(regex: str) -> str:
    import llguidance

    if not isinstance(regex, str) or not regex:
        raise ConstraintError("regex must be a non-empty string")
    _check_size("regex", regex)
    if _bracket_depth(regex) > MAX_NESTING:
        raise ConstraintError(f"the regex nests groups more than {MAX_NESTING} levels deep")
    return llguidance.LLMatcher.grammar_from_regex(regex)


def _choice_grammar(choice: tuple[str, ...]) -> str:
    if not choice:
        raise ConstraintError("choice is empty: give at least one string")
    if len(choice) > MAX_CHOICES:
        raise ConstraintError(f"choice has {len(choice)} strings; at most {MAX_CHOICES} are allowed")
    if not all(isinstance(c, str) and c for c in choice):
        raise ConstraintError("choice must hold non-empty strings")
    _check_size("choice list", "".join(choice))
    return _lark_grammar("start: " + " | ".join(json.dumps(c) for c in dict.fromkeys(choice)), checked=True)


def _lark_grammar(lark: str, checked: bool = False) -> str:
    import llguidance

    if not checked:
        if not isinstance(lark, str) or not lark.strip():
            raise ConstraintError("grammar must be a non-empty string (Lark syntax)")
        _check_size("grammar", lark)
        if _bracket_depth(lark) > MAX_NESTING:
            raise ConstraintError(f"the grammar nests brackets more than {MAX_NESTING} levels deep")
    return llguidance.LLMatcher.grammar_from_lark(lark)


_ERROR_PREFIX = re.compile(r"^(Grammar error|Error): *", re.I)
_POSITION = re.compile(r"^at \d+\(\d+\): *")


class GrammarCompiler:
    """Compiles constraints into llguidance matchers over one vocabulary.

    `tokenizer_json` is the `tokenizers` serialisation of the tokenizer; `n_vocab` the model's vocabulary (ids past
    the tokenizer's are never allowed); `stop_ids` the tokens that end the output, allowed only once the grammar is
    complete. Building the engine's view of a 262,144-token vocabulary takes seconds: build one per tokenizer and
    stop set, and reuse it (thread-safe)."""

    def __init__(self, tokenizer_json: str, n_vocab: int, stop_ids: list[int]):
        import llguidance

        if not stop_ids:
            raise ConstraintError("constrained generation needs an end-of-sequence token (eos_token_id)")
        self.n_vocab, self.stop_ids = n_vocab, tuple(stop_ids)
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(stop_ids))
        self._limits = llguidance.LLParserLimits(**_ENGINE_LIMITS)
        self._lock = threading.Lock()

    def matcher(self, constraint: Constraint):
        """A fresh `llguidance.LLMatcher` at the start of the constrained text; raises `ConstraintError`."""
        import llguidance

        if not isinstance(constraint, Constraint):
            raise ConstraintError(f"constraint must be a dgemma Constraint, got {type(constraint).__name__}")
        source = constraint.source()
        with self._lock:
            matcher = llguidance.LLMatcher(self._tokenizer, source, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise ConstraintError(f"{constraint.kind.replace('_', ' ')}: {_engine_message(matcher.get_error())}")
        if not matcher.is_accepting() and not _allows_a_token(matcher.compute_bitmask(), self.stop_ids):
            raise ConstraintError(f"{constraint.kind.replace('_', ' ')} matches no text")
        return matcher


def _allows_a_token(bitmask: bytes, stop_ids: tuple[int, ...]) -> bool:
    """Whether a token mask allows some token other than the stop tokens (which the engine allows at a dead end)."""
    bits = bytearray(bitmask)
    for t in stop_ids:
        if t >> 3 < len(bits):
            bits[t >> 3] &= 0xFF ^ (1 << (t & 7))
    return any(bits)


def _engine_message(message: str) -> str:
    """The engine's error, first line, without its own prefixes (it may carry a source excerpt below)."""
    lines = message.strip().splitlines()
    first = lines[0] if lines else "rejected by the grammar engine"
    first = _ERROR_PREFIX.sub("", _POSITION.sub("", first))
    detail = next((ln.strip()[len("error:"):].strip() for ln in lines[1:] if ln.strip().startswith("error:")), None)
    if detail:  # a regex parse error: the engine names the problem on a later line, below a source excerpt
        return f"{first.removesuffix(':').replace(' (in regex): regex parse error', '')}: {detail}"
    if first.startswith("Unimplemented keys"):
        return f"unsupported JSON schema keywords {first.split(':', 1)[1].strip()}"
    return first
