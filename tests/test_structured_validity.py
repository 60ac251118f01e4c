"""Validity by construction with the shipped model, which knows no JSON: every output that the constraint reports
complete parses and validates (`jsonschema`, formats checked), over a suite of JSON schemas, the same schemas as
tool-call parameters (Gemma 4's syntax, markers as text and as special tokens), and hypothesis-generated schemas.
An output cut by max_new_tokens must be reported incomplete and be a valid prefix; those are counted apart."""

from __future__ import annotations

import json
import os
import shutil

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma import Constraint, DiffusionGemma
from dgemma.sampling.formats import FORMATS
from dgemma.serve.tool_grammar import CALL_END, CALL_START, QUOTE, call_constraint
from dgemma.serve.tool_parser import parse_tool_calls

PROMPT = 'data = {"a": 1, "b": [2, 3], "c": "x"}\nvalue = '
FAST = dict(max_new_tokens=96, max_denoising_steps=4)  # three 32-token canvases, four passes at most each
ROWS = 16  # schemas per batch (each row its own constraint)
FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def _s(**kw):
    return {"type": "string", **kw}


def _i(**kw):
    return {"type": "integer", **kw}


def _n(**kw):
    return {"type": "number", **kw}


def _obj(props, required=None, **kw):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


SCHEMAS = [
    _obj({"a": _i()}), _obj({"a": _i(minimum=10, maximum=20)}), _obj({"a": _i(exclusiveMinimum=0, exclusiveMaximum=5)}),
    _obj({"x": _n(minimum=-1.5, maximum=2.25)}), _obj({"x": _n(exclusiveMinimum=0, maximum=1)}),
    _obj({"n": _i(minimum=-1000)}), _obj({"n": _n(maximum=-3)}),
    _obj({"s": _s(maxLength=8)}), _obj({"s": _s(minLength=3, maxLength=5)}),
    _obj({"s": _s(pattern="^[a-z]{3}-[0-9]{2}$")}), _obj({"s": _s(pattern="^(foo|bar)+$")}),
    _obj({"zip": _s(pattern="^[0-9]{5}(-[0-9]{4})?$")}), _obj({"s": _s(pattern="[0-9]")}),
    *[_obj({"f": _s(format=f)}) for f in FORMATS],
    _obj({"c": {"enum": ["red", "green", "blue"]}}), _obj({"c": {"enum": [1, "two", None, True]}}),
    _obj({"c": {"const": "fixed"}}), _obj({"b": {"type": "boolean"}, "z": {"type": "null"}}),
    _obj({"l": {"type": "array", "items": _i(), "minItems": 2, "maxItems": 4}}),
    _obj({"l": {"type": "array", "items": _s(maxLength=4), "maxItems": 3}}),
    _obj({"l": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 5, "maxItems": 5}}),
    _obj({"l": {"type": "array", "items": _obj({"k": _i(minimum=0, maximum=9)}), "minItems": 1, "maxItems": 3}}),
    _obj({"m": {"type": "array", "items": {"type": "array", "items": _i(), "maxItems": 2}, "minItems": 1,
                "maxItems": 2}}),
    _obj({"t": {"type": "array", "prefixItems": [_i(), _s(maxLength=3)], "items": False}}),
    _obj({"a": _i(), "b": _s(maxLength=5)}, required=["a"]),
    _obj({"a": _i(), "b": _s(maxLength=5), "c": {"type": "boolean"}}, required=[]),
    _obj({"a": _i(), "b": _i(), "c": _i(), "d": _i()}, required=["b", "d"]),
    _obj({"o": _obj({"p": _obj({"q": _i(maximum=3)})})}),
    _obj({"name": _s(maxLength=10), "address": _obj({"street": _s(maxLength=10), "city": _s(maxLength=8)},
                                                     required=["city"])}),
    {"$defs": {"pt": _obj({"x": _i(), "y": _i()})}, **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
    {"$defs": {"id": _s(pattern="^[A-Z]{2}[0-9]{3}$")},
     **_obj({"ids": {"type": "array", "items": {"$ref": "#/$defs/id"}, "maxItems": 3}})},
    {"$defs": {"leaf": {"enum": ["x", "y"]}, "node": _obj({"v": {"$ref": "#/$defs/leaf"}})},
     **_obj({"n": {"$ref": "#/$defs/node"}})},
    _obj({"v": {"anyOf": [_i(), _s(maxLength=3)]}}),
    _obj({"v": {"anyOf": [_obj({"kind": {"const": "a"}, "n": _i()}), _obj({"kind": {"const": "b"}, "s": _s(maxLength=4)})]}}),
    _obj({"v": {"anyOf": [{"type": "null"}, _n(minimum=0, maximum=1)]}}),
    _obj({"v": {"type": ["integer", "string"], "maxLength": 3}}),
    _obj({"q": _i(multipleOf=5, minimum=0, maximum=50), "p": _s(pattern="^\\+?[0-9]{1,3} [0-9]{4,6}$")}),
    _obj({"s": _s(minLength=2, maxLength=4, pattern="^[a-z]+$")}),
    _obj({"a": _obj({}, required=[]), "b": {"type": "array", "maxItems": 0}}),
    _obj({"when": _s(format="date"), "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
          "score": _n(minimum=0, maximum=10)}, required=["when"]),
    # not objects at the top (JSON only: a tool's parameters are an object)
    {"anyOf": [_obj({"ok": {"const": True}}), _obj({"error": _s(maxLength=10)})]},
    {"type": "array", "items": _i(minimum=0, maximum=99), "minItems": 3, "maxItems": 6},
    {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 4},
    _s(pattern="^[0-9a-f]{8}$"), _i(minimum=100, maximum=200), _n(minimum=0.5, maximum=0.75),
    {"enum": ["alpha", "beta", "gamma"]}, {"type": "boolean"},
    _obj({"meta": {"type": "object", "additionalProperties": _i(), "maxProperties": 2}}),
]
TOOL_SCHEMAS = [s for s in SCHEMAS if s.get("type") == "object" and "maxProperties" not in json.dumps(s)]


@pytest.fixture(scope="module")
def model():
    return DiffusionGemma.from_pretrained("dgemma-code-tiny")


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory):
    """The shipped model with Gemma 4's call markers as special tokens (in place of three unused ones), as the real
    vocabulary has them."""
    from dgemma.shipped import resolve

    path = tmp_path_factory.mktemp("markers")
    shutil.copytree(resolve("dgemma-code-tiny")[1], path, dirs_exist_ok=True)
    spec = json.loads((path / "tokenizer.json").read_text())
    names = {5: CALL_START, 6: CALL_END, 7: QUOTE}
    for token in spec["added_tokens"]:
        if token["id"] in names:
            token["content"] = names[token["id"]]
    vocab = spec["model"]["vocab"]
    for name in [k for k, v in vocab.items() if v in names]:
        del vocab[name]
    vocab.update({v: k for k, v in names.items()})
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return DiffusionGemma.from_pretrained(str(path)), {CALL_START: 5, CALL_END: 6, QUOTE: 7}


def _outputs(model, constraints, seed=0, skip_special=True):
    """(text, complete, tokens) per row, one batch per ROWS constraints."""
    ids = model.tokenizer.encode(PROMPT)
    stop = set(model.generation_config.eos_token_id)
    got = []
    for start in range(0, len(constraints), ROWS):
        rows = constraints[start:start + ROWS]
        out = model.generate([ids] * len(rows), constraint=rows, seed=list(range(seed + start, seed + start + len(rows))),
                             **FAST)
        for row, complete in zip(out.sequences, out.stats.grammar_complete):
            tokens = row[len(ids):].tolist()
            tokens = tokens[:next((i for i, t in enumerate(tokens) if t in stop), len(tokens))]
            got.append((model.tokenizer.decode(tokens, skip_special_tokens=skip_special), complete, tokens))
    return got


def _run(model, cases, seed=0, skip_special=True) -> tuple[int, int]:
    """Generate for each (constraint, validate) case; each complete output must pass `validate(text)`, each
    incomplete one be a valid prefix of its grammar. (complete, incomplete)"""
    constraints = [c for c, _ in cases]
    outputs = _outputs(model, constraints, seed, skip_special)
    compiler = model.grammar_compiler(model.generation_config.eos_token_id)
    counts = [0, 0]
    for (constraint, validate), (text, complete, tokens) in zip(cases, outputs):
        assert complete in (True, False)
        if complete:
            validate(text)
        else:
            matcher = compiler.matcher(constraint)
            assert matcher.try_consume_tokens(tokens) == len(tokens), f"not a valid prefix: {text!r}"
        counts[not complete] += 1
    return counts[0], counts[1]


def _json_case(schema):
    def validate(text):
        jsonschema.validate(json.loads(text), schema, format_checker=FORMAT_CHECKER)
    return Constraint(json_schema=schema), validate


def _call_case(schema, token_ids):
    def validate(text):
        content, calls = parse_tool_calls(text)
        assert content == "" and len(calls) == 1 and calls[0]["function"]["name"] == "f", text
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schema, format_checker=FORMAT_CHECKER)
    return call_constraint({"f": schema}, ["f"], False, token_ids), validate


TEXT_MARKERS = {CALL_START: None, CALL_END: None, QUOTE: None}


def test_json_schema_suite(model):
    assert len(SCHEMAS) >= 50
    complete, incomplete = _run(model, [_json_case(s) for s in SCHEMAS])
    print(f"JSON schemas: {complete} complete and valid, {incomplete} cut by max_new_tokens (valid prefixes)")
    assert complete >= 2 * len(SCHEMAS) // 3  # most finish within 96 tokens (unbounded numbers may not)


def test_tool_call_arguments_follow_the_schema(model):
    complete, incomplete = _run(model, [_call_case(s, TEXT_MARKERS) for s in TOOL_SCHEMAS], skip_special=False)
    print(f"tool calls: {complete} complete and valid, {incomplete} cut by max_new_tokens")
    assert complete >= 2 * len(TOOL_SCHEMAS) // 3


def test_tool_calls_with_special_token_markers(marker_model):
    model, token_ids = marker_model
    complete, incomplete = _run(model, [_call_case(s, token_ids) for s in TOOL_SCHEMAS[:ROWS]], seed=100,
                                skip_special=False)
    print(f"tool calls, markers as special tokens: {complete} complete and valid, {incomplete} cut by max_new_tokens")
    assert complete >= ROWS // 2


def test_a_string_argument_may_hold_anything_but_its_delimiter(model):
    code = f'if a < b: print("}}{CALL_END}")'
    text = f"{CALL_START}call:f{{code:{QUOTE}{code}{QUOTE}}}{CALL_END}"
    content, calls = parse_tool_calls(text)
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"code": code}
    compiler = model.grammar_compiler(model.generation_config.eos_token_id)
    grammar = call_constraint({"f": _obj({"code": _s(maxLength=40)})}, ["f"], False, TEXT_MARKERS)
    tokens = model.tokenizer.encode(text, add_bos=False)
    matcher = compiler.matcher(grammar)
    assert matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()
    inside = model.tokenizer.encode(f"{CALL_START}call:f{{code:{QUOTE}a{QUOTE}b{QUOTE}}}{CALL_END}", add_bos=False)
    assert compiler.matcher(grammar).try_consume_tokens(inside) < len(inside)  # the delimiter ends the string


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_regexes_write_what_the_validators_accept(name):
    assert name in FORMAT_CHECKER.checkers  # (a format without its checker package would pass unchecked)
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(FORMATS[name], fullmatch=True))
    def check(value):
        assert FORMAT_CHECKER.conforms(value, name), value
    check()


# -- hypothesis: random schemas from the same features -----------------------------------------------------------

_KEYS = st.text("abcdefgh", min_size=1, max_size=5)
_PATTERNS = ["^[a-z]{2,5}$", "^[A-Z][0-9]{2}$", "^(ab|cd)+$", "^x", "[0-9]$", "^[0-9a-f]{4}-[0-9a-f]{4}$"]


@st.composite
def _integer(draw):
    schema, lo = {"type": "integer"}, draw(st.none() | st.integers(-500, 500))
    if lo is not None:
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = lo
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = (lo or 0) + draw(st.integers(2, 500))
    return schema


@st.composite
def _number(draw):
    quarter = st.integers(-400, 400).map(lambda n: n / 4)
    schema, lo = {"type": "number"}, draw(st.none() | quarter)
    if lo is not None:
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = lo
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = (lo or 0) + draw(st.integers(1, 40)) / 4
    return schema


@st.composite
def _string(draw):
    kind = draw(st.sampled_from(["length", "pattern", "format", "plain"]))
    if kind == "length":
        lo = draw(st.integers(0, 4))
        return {"type": "string", "minLength": lo, "maxLength": lo + draw(st.integers(0, 8))}
    if kind == "pattern":
        return {"type": "string", "pattern": draw(st.sampled_from(_PATTERNS))}
    if kind == "format":
        return {"type": "string", "format": draw(st.sampled_from(sorted(FORMATS)))}
    return {"type": "string", "maxLength": 6}


_SCALAR = st.one_of(st.integers(-9, 99), st.text("xyz", min_size=1, max_size=3), st.booleans(), st.none())
_LEAF = st.one_of(_integer(), _number(), _string(), st.just({"type": "boolean"}), st.just({"type": "null"}),
                  st.lists(_SCALAR, min_size=1, max_size=4, unique_by=lambda v: (type(v), v)).map(lambda v: {"enum": v}),
                  _SCALAR.map(lambda v: {"const": v}))


@st.composite
def _object(draw, children):
    props = draw(st.dictionaries(_KEYS, children, min_size=1, max_size=4))
    required = [k for k in props if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@st.composite
def _array(draw, children):
    lo = draw(st.integers(0, 2))
    return {"type": "array", "items": draw(children), "minItems": lo, "maxItems": lo + draw(st.integers(0, 3))}


def _composite(children):
    return st.one_of(_object(children), _array(children),
                     st.lists(children, min_size=2, max_size=3).map(lambda alts: {"anyOf": alts}))


_SCHEMA = st.recursive(_LEAF, _composite, max_leaves=6)


@st.composite
def _parameters(draw):
    """An object schema, one of its properties given through $defs/$ref half of the time."""
    props = draw(st.dictionaries(_KEYS, _SCHEMA, min_size=1, max_size=3))
    schema = {"type": "object", "properties": props, "required": [k for k in props if draw(st.booleans())],
              "additionalProperties": False}
    if draw(st.booleans()):
        key = sorted(props)[0]
        schema["$defs"] = {"shared": props[key]}
        props[key] = {"$ref": "#/$defs/shared"}
    return schema


@settings(max_examples=int(os.environ.get("DGEMMA_SCHEMA_EXAMPLES", "3")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(_parameters(), min_size=ROWS // 2, max_size=ROWS // 2), st.integers(0, 1000))
def test_hypothesis_schemas_validate_as_json_and_as_calls(model, schemas, seed):
    """DGEMMA_SCHEMA_EXAMPLES=40 runs 40 batches of 8 random schemas, each as JSON and as a call."""
    complete, incomplete = _run(model, [_json_case(s) for s in schemas] + [_call_case(s, TEXT_MARKERS) for s in schemas],
                                seed, skip_special=False)
    print(f"random schemas: {complete} complete and valid, {incomplete} cut by max_new_tokens")
