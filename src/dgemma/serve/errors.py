"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 504: "timeout_error"}


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_SAMPLER_HINT = "; DiffusionGemma samples along a temperature schedule: set t_min and t_max instead"
_HINTS = {"temperature": _SAMPLER_HINT, "top_p": _SAMPLER_HINT}


def _validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's most telling complaint as `param: message`. Of the alternatives of a union field, a broken
    constraint tells more than a type mismatch; the union's branch tags are dropped from the path."""
    errors = sorted(exc.errors(), key=lambda e: str(e.get("type", "")).endswith("_type"))
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())[1:]  # after "body"
           if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))]
    param = ".".join(loc) if loc else None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown parameter {param!r}{_HINTS.get(param, '')}", param=param,
                        code="unknown_parameter")
    if param is None and kind.endswith("_type"):
        return APIError(400, "the request body must be a JSON object", code="invalid_value")
    if kind == "missing":
        return APIError(400, f"missing required parameter {param!r}" if param else "missing request body",
                        param=param, code="missing_parameter")
    message = first.get("msg", "invalid value")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# codes for the errors the web framework raises itself (unknown route, wrong method; a body that outgrows the limit
# while it is read arrives as an HTTPException from the size-limiting middleware)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's, e.g. not UTF-8
            return APIError(400, "the request body could not be read as JSON (is it UTF-8?)",
                            code="invalid_json").response()
        code = _HTTP_CODES.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug: still an OpenAI-style body
        return APIError(500, f"internal error: {type(exc).__name__}").response()
