"""Errors in the OpenAI shape `{"error": {"message", "type", "param", "code"}}`, for every 4xx/5xx the ingress sends."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .calls import CallError

logger = logging.getLogger("sae_serve")

# The `type` OpenAI's API gives each status (its SDK maps the status to an exception class).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}

# A model replica or engine that is down is replaced by Ray Serve (the engine restarts in about a minute).
UNAVAILABLE_RETRY_AFTER = {"Retry-After": "5"}


class APIError(Exception):
    """Raised anywhere in a request; rendered in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def from_call(cls, err: CallError) -> "APIError":
        return cls(err.status, err.message, err.param, err.code,
                   headers=UNAVAILABLE_RETRY_AFTER if err.status == 503 else None)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def loc_to_param(loc: tuple) -> str:
    """('body', 'steering', 0, 'foo') -> 'steering[0].foo' (the names a client sent)."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path") and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _client_loc(loc: tuple) -> tuple:
    # pydantic tags each union member / function validator in the location; users never wrote those names.
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")
                                                                   or p in _UNION_TAGS)))


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # Of a union's failed members, the deepest error is the one that got furthest: usually the intended member.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = loc_to_param(_client_loc(first.get("loc", ()))) or None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI shape: ours, validation (400 as OpenAI does, not 422), 404/405, crashes."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(APIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error"))
