"""The service's expected failures as typed exceptions, shared by every process of `serve/`.

They are raised where the failure is found (the replica, the engine facade, the ingress) and cross Ray as
themselves: Ray re-raises a user exception as a subclass of both `RayTaskError` and its class, and the ingress's
replica client unwraps it to the original (`serve/http/replica_client.py`). `serve/http/errors.py` is the one place
that turns them into the OpenAI error shape. Plain Python: no FastAPI, no torch.
"""

from __future__ import annotations

from typing import ClassVar

# A model replica or engine that is down is replaced by Ray Serve (the engine restarts in about a minute).
RETRY_AFTER_S = 5


class ServeError(Exception):
    """A request that cannot be served; `status` and `code` say how, `param` names the request field at fault."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str | None] = None
    default_message: ClassVar[str] = "the request failed"
    default_headers: ClassVar[dict[str, str] | None] = None

    def __init__(
        self,
        message: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message = message if message is not None else self.default_message
        headers = headers if headers is not None else self.default_headers
        # All four in args, so that pickling (Ray) rebuilds the same exception.
        super().__init__(message, param, code, headers)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers) if headers is not None else None

    def __str__(self) -> str:
        return self.message


class InvalidRequest(ServeError):
    """400: the request cannot run as given."""

    status = 400


class SpecError(InvalidRequest):
    """400: a steering or capture spec that cannot run; `param` names the offending field."""


class ContextLengthExceeded(InvalidRequest):
    """400: prompt and completion do not fit the model's context or the server's prompt limit."""

    default_code = "context_length_exceeded"


class AuthenticationFailed(ServeError):
    """401: no key or an unknown key."""

    status = 401
    default_code = "invalid_api_key"


class PermissionDenied(ServeError):
    """403: the key may not do this."""

    status = 403
    default_code = "insufficient_permissions"


class NotFound(ServeError):
    """404: no such model, SAE, feature, plot or page asset."""

    status = 404


class PayloadTooLarge(ServeError):
    """413: the request body is over the server's limit."""

    status = 413


class Unavailable(ServeError):
    """503: retry later; carries Retry-After."""

    status = 503
    default_headers = {"Retry-After": str(RETRY_AFTER_S)}


class EngineUnavailable(Unavailable):
    """503: the replica's engine is not running (not started, shut down or dead)."""

    default_code = "engine_unavailable"
    default_message = "the engine is not running; retry shortly"


class ModelUnavailable(Unavailable):
    """503: no model replica answers (killed, restarting)."""

    default_code = "model_unavailable"
    default_message = "the model is unavailable; retry shortly"


class Overloaded(Unavailable):
    """503: the model deployment's queue is full."""

    default_code = "overloaded"


class SteeringUnavailable(ServeError):
    """503: this engine refuses steering (its probe found steering not applied on decode steps); plain
    generation is still served. Retrying does not help: the operator must fix the engine's configuration."""

    status = 503
    default_code = "steering_unavailable"


class InternalError(ServeError):
    """500: a failure of ours the caller cannot fix."""

    status = 500
