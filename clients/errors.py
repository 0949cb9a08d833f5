"""Exceptions carrying the service's OpenAI-shaped error `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from typing import Any


class SAEServeError(Exception):
    """Any failed call; `status` is None when no HTTP response came back (connection refused, timeout)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (param {self.param})" if self.param else ""
        head = f"{self.status} {self.type or 'error'}" if self.status is not None else self.type or "error"
        return f"{head}: {self.message}{where}"


class APIConnectionError(SAEServeError):
    """No response: the service is unreachable or the request timed out."""


class BadRequestError(SAEServeError):
    """400 (and other 4xx without a class of their own): the request is invalid; `param` names the field."""


class AuthenticationError(SAEServeError):
    """401: missing or wrong API key."""


class PermissionDeniedError(SAEServeError):
    """403: the key lacks admin scope."""


class NotFoundError(SAEServeError):
    """404: unknown model, SAE, feature or route."""


class RequestTooLargeError(SAEServeError):
    """413: the body is above the service's limit."""


class RateLimitError(SAEServeError):
    """429: too many requests; retried by the client before it is raised."""


class InternalServerError(SAEServeError):
    """5xx other than 503."""


class ServiceUnavailableError(SAEServeError):
    """503: overloaded or the engine is restarting; retried by the client before it is raised."""


_BY_STATUS: dict[int, type[SAEServeError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: RequestTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}

# The status an error event inside a stream stands for (its headers are long gone); the service's `type`s.
_STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "server_error": 500,
    "service_unavailable_error": 503,
}


def _class_for(status: int) -> type[SAEServeError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else BadRequestError


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the delta-seconds form; HTTP dates are not sent by the service)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_from_body(status: int, body: Any, retry_after: float | None = None) -> SAEServeError:
    """The exception for an error response; `body` is its parsed JSON or raw text."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return _class_for(status)(
            str(err.get("message", "")), status, err.get("type"), err.get("param"), err.get("code"), retry_after
        )
    text = body if isinstance(body, str) else json.dumps(body)
    return _class_for(status)(text.strip() or f"HTTP {status}", status, retry_after=retry_after)


def error_from_event(event: dict) -> SAEServeError:
    """The exception for an `{"error": ...}` event in the middle of a stream."""
    status = _STATUS_OF_TYPE.get(str(event["error"].get("type")), 500)
    return error_from_body(status, event)
