"""Tool calling in Gemma 4's native format: checking a request's `tools` and `tool_choice`.

The model calls a tool by writing `<|tool_call>call:NAME{key:value,...}<tool_call|>`: keys bare, strings between
`<|"|>` delimiters, numbers, `true`/`false`/`null`, nested `{...}` and `[...]` (the official Gemma 4 chat
template renders history the same way; `templates/gemma4_chat.jinja` renders the declarations). In a vocabulary
without these special tokens (the shipped tiny model's), the same strings are written and read as plain text.
`tool_grammar` constrains a required call to its function's parameter schema; `tool_parser` reads the calls.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import APIError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


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
