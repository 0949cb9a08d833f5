"""The one place exceptions become the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`.

Every 4xx/5xx the ingress sends leaves through here: the service's typed errors (`serve.errors`), request
validation (400 as OpenAI answers, not FastAPI's 422), Starlette's 404/405, and crashes (500, logged).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.errors import InternalError, InvalidRequest, ServeError

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


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(err: ServeError) -> dict:
    return {"error": {"message": err.message, "type": error_type(err.status), "param": err.param, "code": err.code}}


def error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


class _StatusError(ServeError):
    """A Starlette HTTPException (unknown path, wrong method) carried with its own status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None):
        super().__init__(message, headers=headers)
        self.status = status  # type: ignore[misc]  # per instance: Starlette's status, not a class of ours


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
    return tuple(
        p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-") or p in _UNION_TAGS))
    )


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    if not errors:
        return InvalidRequest("invalid request")
    # Of a union's failed members, the deepest error is the one that got furthest: usually the intended member.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    param = loc_to_param(_client_loc(first.get("loc", ()))) or None
    msg = first.get("msg", "invalid value")
    return InvalidRequest(f"{param}: {msg}" if param else msg, param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI shape: ours, validation, 404/405, crashes."""

    @app.exception_handler(ServeError)
    async def _ours(_: Request, exc: ServeError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(_StatusError(exc.status_code, message, getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError("internal server error"))
