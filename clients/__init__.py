"""Python SDK, CLI and load tests of sae-serve. Imports nothing of `sae`, `serve` or `trainer`: only httpx and pydantic
(and locust for the load tests)."""

from .client import AsyncSAEServeClient, SAEServeClient
from .errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    SAEServeError,
    ServiceUnavailableError,
)
from .request_models import ChatMessage, SteeringEntry
from .retry import RetryPolicy

__all__ = [
    "APIConnectionError",
    "AsyncSAEServeClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatMessage",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "RetryPolicy",
    "SAEServeClient",
    "SAEServeError",
    "ServiceUnavailableError",
    "SteeringEntry",
]
