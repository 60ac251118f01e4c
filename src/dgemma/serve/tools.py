"""Tool calling in Gemma 4's native format: checking `tools` and `tool_choice`, the grammar of a required call, and
parsing the model's calls into OpenAI `tool_calls`.

The model calls a tool by writing `<|tool_call>call:NAME{key:value,...}<tool_call|>`: keys bare, strings between
`<|"|>` delimiters, numbers, `true`/`false`/`null`, nested `{...}` and `[...]` (the official Gemma 4 chat
template renders history the same way; `templates/gemma4_chat.jinja` renders the declarations). In a vocabulary
without these special tokens (the shipped tiny model's), the same strings are written and read as plain text.

`tool_choice` "required" or a named function constrains the canvas to such calls, with the arguments following
each function's parameter schema: types, enums, required and optional properties (in sorted key order, as the
template renders them), nesting, array bounds, string maxLength. A string argument cannot contain "<". Other
keywords (patterns, formats, numeric bounds) are not enforced inside a call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ..sampling.grammar import Constraint
from .errors import APIError

CALL_START, CALL_END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_PROPERTIES = 64


def check_tools(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """{name: parameters schema} of the request's tools; 400 for a tool that is not a function with a JSON schema."""
    from jsonschema import SchemaError, validators

    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(400, f"tools[{i}].function.name must be a name of letters, digits, _ . - (at most 64)",
                           param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters is not a JSON schema (an object)", param="tools")
        try:
            validators.validator_for(params, default=validators.Draft202012Validator).check_schema(params)
        except SchemaError as e:
            raise APIError(400, f"tools[{i}].function.parameters is not a valid JSON schema: {e.message}",
                           param="tools") from None
        if params.get("type", "object") != "object":
            raise APIError(400, f"tools[{i}].function.parameters must describe an object", param="tools")
        out[name] = params
    return out


def chosen_tools(tool_choice: str | dict[str, Any] | None, tools: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """(mode, names): mode "none", "auto" or "required"; the functions a required call may name."""
    if tool_choice is None:
        return ("auto" if tools else "none"), list(tools)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f'tool_choice must be "none", "auto", "required" or a function, got {tool_choice!r}',
                           param="tool_choice")
        if tool_choice != "none" and not tools:
            raise APIError(400, f'tool_choice "{tool_choice}" needs tools', param="tool_choice")
        return tool_choice, list(tools)
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise APIError(400, 'tool_choice must name a function: {"type": "function", "function": {"name": ...}}',
                       param="tool_choice")
    if name not in tools:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                            f"({', '.join(tools) or 'none given'})", param="tool_choice")
    return "required", [name]


# -- the grammar of a call ---------------------------------------------------------------------------

class _Grammar:
    """Lark rules for calls; special tokens by id where the vocabulary has them, else as text."""

    def __init__(self, token_ids: dict[str, int | None]):
        self.rules: list[str] = []
        self.marks = {s: (f"<[{i}]>" if i is not None else json.dumps(s)) for s, i in token_ids.items()}

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, schema: Any, depth: int = 0) -> str:
        if depth > 16 or not isinstance(schema, dict):
            return self.rule(self._any())
        q = self.marks[QUOTE]
        if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
            return self.rule(" | ".join(self._literal(v) for v in schema["enum"]))
        if "const" in schema:
            return self.rule(self._literal(schema["const"]))
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.rule(" | ".join(self.value(s, depth + 1) for s in schema[key]))
        kind = schema.get("type")
        if isinstance(kind, list) and kind:
            return self.rule(" | ".join(self.value({**schema, "type": k}, depth + 1) for k in kind))
        if kind == "string":
            n = schema.get("maxLength")
            return self.rule(f"{q} /[^<]{{0,{int(n)}}}/ {q}" if isinstance(n, int) else f"{q} /[^<]*/ {q}")
        if kind == "integer":
            return self.rule('/-?(0|[1-9][0-9]{0,15})/')
        if kind == "number":
            return self.rule('/-?(0|[1-9][0-9]{0,15})(\\.[0-9]{1,15})?/')
        if kind == "boolean":
            return self.rule('"true" | "false"')
        if kind == "null":
            return self.rule('"null"')
        if kind == "array":
            item = self.value(schema.get("items", {}), depth + 1)
            lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
            rest = f'("," {item}){{{max(lo - 1, 0)},{"" if hi is None else max(int(hi) - 1, 0)}}}'
            body = f'"[" {item} {rest} "]"'
            return self.rule(body if lo > 0 else f'"[" "]" | {body}')
        if kind == "object" or "properties" in schema:
            return self.rule(f'"{{" {self.fields(schema, depth)} "}}"')
        return self.rule(self._any())

    def fields(self, schema: dict[str, Any], depth: int) -> str:
        """Properties in sorted key order, required ones always, optional ones possibly left out."""
        props = schema.get("properties") or {}
        if len(props) > MAX_PROPERTIES:
            raise APIError(400, f"a tool's parameters have {len(props)} properties; at most {MAX_PROPERTIES} are "
                                "supported for a required call", param="tools")
        required = set(schema.get("required") or [])
        items = []
        for key in sorted(props):
            if not _KEY.match(key):
                raise APIError(400, f"property name {key!r} cannot be written in Gemma 4's call syntax", param="tools")
            items.append((f'"{key}:" {self.value(props[key], depth + 1)}', key in required))

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
            if "<" in v:
                raise APIError(400, f"enum value {v!r} cannot be written in a call (it holds '<')", param="tools")
            return f"{self.marks[QUOTE]} {json.dumps(v)} {self.marks[QUOTE]}"
        return json.dumps(json.dumps(v))

    def _any(self) -> str:
        q = self.marks[QUOTE]
        return f'{q} /[^<]*/ {q} | /-?[0-9]+(\\.[0-9]+)?/ | "true" | "false" | "null"'


def call_constraint(tools: dict[str, dict[str, Any]], names: list[str], parallel: bool,
                    token_ids: dict[str, int | None]) -> Constraint:
    """The grammar of a required call (one, or one or more with `parallel`) to one of `names`."""
    g = _Grammar(token_ids)
    calls = []
    for name in names:
        fields = g.fields(tools[name], 0)
        calls.append(f'{g.marks[CALL_START]} "call:{name}{{" {fields} "}}" {g.marks[CALL_END]}')
    call = g.rule(" | ".join(calls))
    return Constraint(grammar="\n".join([f"start: {call}{'+' if parallel else ''}", *g.rules]))


# -- parsing the model's calls -----------------------------------------------------------------------

_CALL = re.compile(re.escape(CALL_START) + r"call:([A-Za-z_][A-Za-z0-9_.\-]*)\{(.*?)\}" + re.escape(CALL_END), re.S)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside the calls, OpenAI tool_calls) from the model's output. A call whose arguments do not parse
    is left in the text."""
    calls, content, end = [], [], 0
    for m in _CALL.finditer(text):
        try:
            args = _Args(m.group(2)).object_body()
        except ValueError:
            continue
        content.append(text[end:m.start()])
        end = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": m.group(1), "arguments": json.dumps(args, ensure_ascii=False)}})
    content.append(text[end:])
    return "".join(content).strip(), calls


class _Args:
    """A recursive-descent reader of Gemma 4's argument syntax."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def object_body(self, close: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        while self.i < len(self.s) and not self.s.startswith(close or "\0", self.i):
            colon = self.s.find(":", self.i)
            if colon < 0:
                raise ValueError("key without a value")
            key = self.s[self.i:colon].strip()
            self.i = colon + 1
            out[key] = self.value()
            self._skip(",")
        return out

    def value(self) -> Any:
        s = self.s
        if s.startswith(QUOTE, self.i):
            end = s.find(QUOTE, self.i + len(QUOTE))
            if end < 0:
                raise ValueError("unterminated string")
            text, self.i = s[self.i + len(QUOTE):end], end + len(QUOTE)
            return text
        if s.startswith("{", self.i):
            self.i += 1
            out = self.object_body("}")
            self._expect("}")
            return out
        if s.startswith("[", self.i):
            self.i += 1
            items = []
            while not s.startswith("]", self.i):
                if self.i >= len(s):
                    raise ValueError("unterminated list")
                items.append(self.value())
                self._skip(",")
            self.i += 1
            return items
        m = re.compile(r"[^,}\]]*").match(s, self.i)
        word, self.i = m.group(0).strip(), m.end()
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word]
        try:
            return int(word) if re.fullmatch(r"-?\d+", word) else float(word)
        except ValueError:
            raise ValueError(f"not a value: {word!r}") from None

    def _skip(self, ch: str) -> None:
        if self.s.startswith(ch, self.i):
            self.i += len(ch)

    def _expect(self, ch: str) -> None:
        if not self.s.startswith(ch, self.i):
            raise ValueError(f"expected {ch!r}")
        self.i += 1
