"""A request's structured-output fields as a `Constraint`: OpenAI's `response_format` and vLLM's
`structured_outputs` (`{"json": ...}`, `{"regex": ...}`, `{"choice": [...]}`, `{"grammar": ...}`), checked with
a 400 that names what is wrong."""

from __future__ import annotations

import json
from typing import Any

from ..sampling.grammar import Constraint, ConstraintError
from .errors import APIError

_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def request_constraint(response_format: dict[str, Any] | None, structured: dict[str, Any] | None) -> Constraint | None:
    """The constraint a request asks for (None: free text); raises `APIError` 400 for a bad one."""
    if response_format is not None and structured is not None and response_format.get("type") != "text":
        raise APIError(400, "response_format and structured_outputs both constrain the output; pass one of them",
                       param="structured_outputs")
    param = "response_format" if structured is None else "structured_outputs"
    try:
        constraint = _from_response_format(response_format) if structured is None else _from_structured(structured)
        if constraint is not None:
            constraint.source()  # compiled once here: a bad constraint is refused before the request is queued
    except ConstraintError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from e
    return constraint


def _from_response_format(fmt: dict[str, Any] | None) -> Constraint | None:
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ConstraintError('json_schema must be an object with a "schema" (the JSON Schema) and a "name"')
        return Constraint(json_schema=spec["schema"])
    raise ConstraintError(f'type must be "text", "json_object" or "json_schema", got {kind!r}')


def _from_structured(spec: dict[str, Any]) -> Constraint:
    given = [k for k in _STRUCTURED_KEYS if spec.get(k) not in (None, False)]
    unknown = sorted(set(spec) - set(_STRUCTURED_KEYS))
    if unknown:
        raise ConstraintError(f"unsupported fields {unknown}; dgemma takes one of {', '.join(_STRUCTURED_KEYS)}")
    if len(given) != 1:
        raise ConstraintError(f"give exactly one of {', '.join(_STRUCTURED_KEYS)}")
    key, value = given[0], spec[given[0]]
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"json is not JSON: {e.msg}") from None
        return Constraint(json_schema=value)
    if key == "json_object":
        return Constraint(json_object=True)
    if key == "choice" and not isinstance(value, list):
        raise ConstraintError("choice must be a list of strings")
    if key in ("regex", "grammar") and not isinstance(value, str):
        raise ConstraintError(f"{key} must be a string")
    return Constraint(**{key: value})
