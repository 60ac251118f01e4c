"""The grammar of a required tool call in Gemma 4's syntax, generated from each function's parameter schema.

A call is `<|tool_call>call:NAME{key:value,...}<tool_call|>`: keys bare, in sorted order (as the chat template
renders them), strings between `<|"|>` delimiters, numbers, `true`/`false`/`null`, nested `{...}` and `[...]`.
The grammar (llguidance's Lark dialect) follows the schema:
- strings: `minLength`/`maxLength`, `pattern` (searched, as JSON Schema reads it, unless anchored with ^ and $),
  `format` (`dgemma.sampling.formats`); a string may hold any text but the `<|"|>` delimiter;
- integers and numbers: bounds (exclusive or not) and `multipleOf`, through the engine's own JSON number grammar;
- `enum`, `const`, `type` lists, `anyOf`, `oneOf` over alternatives of different types, `nullable`, local `$ref`s
  (`#/$defs/...`, `#/definitions/...`, recursive ones too);
- objects: required properties always, optional ones possibly left out; arrays: `items`, `prefixItems`, bounds.
A keyword it cannot enforce (`allOf`, `not`, `uniqueItems`, ...) is refused with a 400 naming it, so a required
call is always valid. Where the vocabulary has the markers as special tokens they are matched by id, else as text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..sampling.formats import FORMATS
from ..sampling.grammar import Constraint
from .errors import APIError

CALL_START, CALL_END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_PROPERTIES = 64
MAX_RULES = 4096
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor",
                          "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "strict"})
_SUPPORTED = _ANNOTATIONS | {"type", "enum", "const", "anyOf", "oneOf", "$ref", "nullable", "minLength", "maxLength",
                             "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                             "multipleOf", "items", "prefixItems", "minItems", "maxItems", "properties", "required",
                             "additionalProperties", "minProperties", "maxProperties"}
_NUMBER_KEYS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_NO_DELIMITER = r'~/(?s:.*)<\|"\|>(?s:.*)/'  # a string never holds the text that ends it


def _repeat(body: str, lo: int, hi: int | None) -> str:
    """`body` lo..hi times (hi None: no bound)."""
    if hi == 0:
        return ""
    return f"({body}){{{lo},{'' if hi is None else hi}}}"


def _lark_regex(regex: str) -> str:
    return "/" + regex.replace("/", "\\/") + "/"


def _search_regex(pattern: str) -> str:
    """A JSON-schema `pattern` (found anywhere in the string unless anchored) as a whole-string regex."""
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[1 if start else 0:len(pattern) - 1 if end else len(pattern)]
    return ("" if start else "(?s:.*)") + f"(?:{body})" + ("" if end else "(?s:.*)")


class CallGrammar:
    """Lark rules for calls to some functions of one request."""

    def __init__(self, token_ids: dict[str, int | None]):
        self.rules: list[str] = []
        self.marks = {s: (f"<[{i}]>" if i is not None else json.dumps(s)) for s, i in token_ids.items()}
        self.quote_is_text = token_ids.get(QUOTE) is None
        self._memo: dict[tuple[int, int], str] = {}  # (root, schema) ids -> rule: shared and recursive $refs
        self._alive: list[Any] = []  # the schemas the memo's ids name, kept so that no id is reused
        self._root: dict[str, Any] = {}

    def call(self, name: str, parameters: dict[str, Any]) -> str:
        """The rule of one call to `name` with arguments following `parameters`."""
        self._root = parameters
        fields = self._fields(parameters, f"tools[{name}].parameters")
        return self.rule(f'{self.marks[CALL_START]} "call:{name}{{" {fields} "}}" {self.marks[CALL_END]}')

    def rule(self, body: str, name: str | None = None) -> str:
        """A new rule (or terminal, named in upper case) with `body`; its name."""
        if len(self.rules) >= MAX_RULES:
            raise APIError(400, f"the tools' parameter schemas are too large for a required call (over {MAX_RULES} "
                                "grammar rules)", param="tools")
        name = name or self.new_name()
        self.rules.append(f"{name}: {body}")
        return name

    def new_name(self, prefix: str = "r") -> str:
        return f"{prefix}{len(self.rules) + len(self._memo)}"

    # -- values ------------------------------------------------------------------------------------
    def value(self, schema: Any, where: str) -> str:
        if schema is True or schema == {}:
            return self.rule(self._any(where))
        if not isinstance(schema, dict):
            raise APIError(400, f"{where} is not a schema", param="tools")
        key = (id(self._root), id(schema))
        if key in self._memo:
            return self._memo[key]
        name = self.new_name()
        self._memo[key] = name  # before the body: a recursive $ref refers back to this rule
        self._alive.append(schema)
        self.rule(self._body(schema, where), name)
        return name

    def _body(self, schema: dict[str, Any], where: str) -> str:
        unsupported = sorted(k for k in schema if k not in _SUPPORTED)
        if unsupported:
            raise APIError(400, f"{where} uses {unsupported}, which a required tool call cannot enforce",
                           param="tools")
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k not in _ANNOTATIONS and k != "$ref"}
            if rest:
                raise APIError(400, f"{where}: $ref beside {sorted(rest)} is not supported in a required tool call",
                               param="tools")
            return self.value(self._resolve(schema["$ref"], where), f"{where}.$ref")
        if schema.get("nullable") is True:
            return f'"null" | {self.value({k: v for k, v in schema.items() if k != "nullable"}, where)}'
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise APIError(400, f"{where}.enum must be a non-empty list", param="tools")
            return " | ".join(self._literal(v) for v in schema["enum"])
        if "const" in schema:
            return self._literal(schema["const"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self._alternatives(schema, key, where)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise APIError(400, f"{where}.type is an empty list", param="tools")
            return " | ".join(self.value({**schema, "type": k}, where) for k in kind)
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind == "string":
            return self._string(schema, where)
        if kind in ("integer", "number"):
            return "%json " + json.dumps({k: schema[k] for k in _NUMBER_KEYS if k in schema})
        if kind == "boolean":
            return '"true" | "false"'
        if kind == "null":
            return '"null"'
        if kind == "array":
            return self._array(schema, where)
        if kind == "object":
            return f'"{{" {self._fields(schema, where)} "}}"'
        if kind is None:
            return self._any(where)
        raise APIError(400, f"{where}.type {kind!r} is not a JSON schema type", param="tools")

    def _alternatives(self, schema: dict[str, Any], key: str, where: str) -> str:
        options = schema[key]
        if not isinstance(options, list) or not options:
            raise APIError(400, f"{where}.{key} must be a non-empty list", param="tools")
        if key == "oneOf":  # exactly one must match: only alternatives of different types are surely exclusive
            kinds = [o.get("type") if isinstance(o, dict) else None for o in options]
            if not all(isinstance(k, str) for k in kinds) or len(set(kinds)) != len(kinds) \
                    or {"integer", "number"} <= set(kinds):
                raise APIError(400, f"{where}.oneOf is supported in a required tool call only over alternatives of "
                                    "different types; use anyOf", param="tools")
        rest = {k: v for k, v in schema.items() if k not in _ANNOTATIONS and k != key}
        return " | ".join(self.value({**rest, **o} if isinstance(o, dict) else o, f"{where}.{key}[{i}]")
                          for i, o in enumerate(options))

    def _resolve(self, ref: Any, where: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise APIError(400, f"{where}.$ref {ref!r}: only local references (#/...) are supported", param="tools")
        node: Any = self._root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise APIError(400, f"{where}.$ref {ref!r} points to nothing", param="tools")
            node = node[part]
        return node

    def _string(self, schema: dict[str, Any], where: str) -> str:
        parts = [_NO_DELIMITER]
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if lo or hi is not None:
            parts.append(_lark_regex(f"(?s:.{{{int(lo)},{'' if hi is None else int(hi)}}})"))
        if "pattern" in schema:
            parts.append(_lark_regex(_search_regex(str(schema["pattern"]))))
        if "format" in schema:
            if schema["format"] not in FORMATS:
                raise APIError(400, f"{where}.format {schema['format']!r} is not supported; dgemma knows "
                                    f"{', '.join(FORMATS)}", param="tools")
            parts.append(_lark_regex(FORMATS[schema["format"]]))
        content = " & ".join(parts if len(parts) > 1 else ["/(?s:.*)/", *parts])
        return self._quoted(content)

    def _quoted(self, content: str) -> str:
        """A string value: one lexeme (delimiters included) when the delimiter is text, else between its tokens."""
        q = self.marks[QUOTE]
        if self.quote_is_text:
            return self.rule(f"{q} ({content}) {q}", self.new_name("S"))
        return f"{q} {self.rule(content, self.new_name('S'))} {q}"

    def _array(self, schema: dict[str, Any], where: str) -> str:
        lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
        prefix = [self.value(p, f"{where}.prefixItems[{i}]") for i, p in enumerate(schema.get("prefixItems") or [])]
        items = schema.get("items", {})
        item = None if items is False else self.value(items, f"{where}.items")
        hi = len(prefix) if item is None and (hi is None or hi > len(prefix)) else hi
        if hi is not None and (hi < lo or hi < 0):
            raise APIError(400, f"{where}: no array satisfies minItems/maxItems", param="tools")
        body = self._items(prefix, item, lo, None if hi is None else int(hi))
        return f'"[" {body} "]"' if body else '"[" "]"'

    def _items(self, prefix: list[str], item: str | None, lo: int, hi: int | None, i: int = 0) -> str:
        """Comma-separated values from the i-th on (i written already): the prefix items in order, then `item`;
        lo..hi values in all."""
        if hi is not None and i >= hi or i >= len(prefix) and item is None:
            return ""
        sep = '"," ' if i else ""
        if i < len(prefix):
            here = f"{sep}{prefix[i]} {self._items(prefix, item, lo, hi, i + 1)}".strip()
            return here if i < lo else f"({here})?"
        need, most = max(lo - i, 0), None if hi is None else hi - i
        if i == 0:  # the first value has no comma before it
            rest = _repeat(f'"," {item}', max(need - 1, 0), None if most is None else most - 1)
            return f"{item} {rest}".strip() if need else f"({item} {rest})?"
        return _repeat(f'"," {item}', need, most)

    def _fields(self, schema: dict[str, Any], where: str) -> str:
        """An object's properties in sorted key order, required ones always, optional ones possibly left out."""
        props = dict(schema.get("properties") or {})
        required = list(schema.get("required") or [])
        extra = schema.get("additionalProperties", True)
        for key in required:  # a required key without its own schema takes additionalProperties'
            if key not in props:
                if extra is False:
                    raise APIError(400, f"{where}: required {key!r} is not among the properties", param="tools")
                props[key] = {} if extra is True else extra
        lo, hi = schema.get("minProperties", 0), schema.get("maxProperties")
        if lo > len(required) or hi is not None and hi < len(props):  # bounds that would constrain the choice
            raise APIError(400, f"{where}: minProperties/maxProperties are supported in a required tool call only "
                                "where the required properties already meet them", param="tools")
        if len(props) > MAX_PROPERTIES:
            raise APIError(400, f"{where} has {len(props)} properties; at most {MAX_PROPERTIES} are supported for a "
                                "required call", param="tools")
        items = []
        for key in sorted(props):
            if not _KEY.match(key):
                raise APIError(400, f"{where}: property name {key!r} cannot be written in Gemma 4's call syntax",
                               param="tools")
            items.append((f'"{key}:" {self.value(props[key], f"{where}.{key}")}', key in required))

        def after(i: int) -> str:  # the rest once something was written
            if i == len(items):
                return ""
            item, req = items[i]
            return (f'"," {item} ' if req else f'("," {item})? ') + after(i + 1)

        def first(i: int) -> str:  # the rest while nothing was written yet
            if i == len(items):
                return ""
            item, req = items[i]
            if req:
                return f"{item} {after(i + 1)}"
            rest = first(i + 1)
            return f"({item} {after(i + 1)} | {rest})" if rest else f"({item} {after(i + 1)})?"

        body = first(0).strip()
        return self.rule(body) if body else ""

    def _literal(self, v: Any) -> str:
        if isinstance(v, str):
            if QUOTE in v:
                raise APIError(400, f"the value {v!r} cannot be written in a call (it holds {QUOTE})", param="tools")
            if self.quote_is_text:  # one lexeme, like the other strings
                return json.dumps(QUOTE + v + QUOTE, ensure_ascii=False)
            inner = f" {json.dumps(v, ensure_ascii=False)} " if v else " "
            return f"{self.marks[QUOTE]}{inner}{self.marks[QUOTE]}"
        if isinstance(v, (dict, list)):
            raise APIError(400, "object and array values in enum/const are not supported in a required tool call",
                           param="tools")
        return json.dumps(json.dumps(v))

    def _any(self, where: str) -> str:
        return f'{self._string({}, where)} | %json {{"type": "number"}} | "true" | "false" | "null"'


def call_constraint(tools: dict[str, dict[str, Any]], names: list[str], parallel: bool,
                    token_ids: dict[str, int | None]) -> Constraint:
    """The grammar of a required call (one, or one or more with `parallel`) to one of `names`."""
    g = CallGrammar(token_ids)
    calls = [g.call(name, tools[name]) for name in names]
    call = g.rule(" | ".join(calls))
    return Constraint(grammar="\n".join([f"start: {call}{'+' if parallel else ''}", *g.rules]))
