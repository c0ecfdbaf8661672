"""Every failure becomes an OpenAI-format error: `{"error": {"message", "type", "param", "code"}}`.

Status codes: 400 malformed JSON or invalid fields (FastAPI's 422 is mapped to 400, as OpenAI
answers), 401 missing/wrong API key, 404 unknown model or route, 400 context length exceeded,
429 over the rate limit, 503 queue full. `PagodaError`s carry their own status; anything else
is a bug and answers a 500 in the same format (logged with its traceback, never sent).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagoda.errors import PagodaError

log = logging.getLogger("pagoda.serve")


class AuthenticationError(PagodaError):
    """The request has no API key or a wrong one."""

    http_status = 401
    code = "invalid_api_key"


class PermissionDeniedError(PagodaError):
    """A valid key asked for something only admin keys may do."""

    http_status = 403
    error_type = "permission_error"
    code = "permission_denied"


class RateLimitError(PagodaError):
    """The API key sent more requests than its per-minute allowance."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotSupportedError(PagodaError):
    """A request field asks for something this server does not implement (yet)."""

    code = "unsupported_parameter"


def with_param(exc: PagodaError, param: str | None) -> PagodaError:
    """Attach the name of the offending request field (OpenAI's `error.param`)."""
    if getattr(exc, "param", None) is None:
        exc.param = param  # type: ignore[attr-defined]
    return exc


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON body of an OpenAI error."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def pagoda_error_body(exc: PagodaError) -> dict[str, Any]:
    """Body of a PagodaError: its one-line message, type, param and code."""
    return error_body(" ".join(str(exc).split()), exc.error_type, getattr(exc, "param", None),
                      exc.code)


def error_response(status: int, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response with this status."""
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """(message, param, code) describing the first validation problem in OpenAI's words."""
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None, None
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return (f"We could not parse the JSON body of your request ({detail}). The body must be "
                "a JSON object.", None, "invalid_json")
    param = _param_path(first.get("loc", ()))
    if kind == "missing":
        if param is None:
            return "The request body is empty: send a JSON object.", None, "invalid_json"
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "The request body must be a JSON object.", None, "invalid_json"
    given = first.get("input")
    shown = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
    return (f"Invalid value for '{param}': {first.get('msg', 'invalid')} (got {shown}).", param,
            "invalid_value")


def _param_path(loc: tuple | list) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content' (union tags dropped)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part) in _UNION_TAGS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "function-after",
                         "function-before", "function-wrap", "literal"})


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception the app can raise onto an OpenAI-format JSON error."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(400, error_body(message, "invalid_request_error", param, code))

    @app.exception_handler(PagodaError)
    async def _pagoda(request: Request, exc: PagodaError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimitError):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        return error_response(exc.http_status, pagoda_error_body(exc), headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
            code = "unknown_url"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            code = "method_not_allowed"
        elif exc.status_code == 400 and "parsing the body" in str(exc.detail):
            message = "We could not parse the body of your request: it must be UTF-8 JSON."
            code = "invalid_json"
        else:
            message, code = str(exc.detail), None
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, error_body(message, kind, None, code),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, error_body(
            f"The server had an internal error ({type(exc).__name__}); it has been logged. "
            "Retry the request, and report it if it persists.", "server_error", None,
            "internal_error"))
