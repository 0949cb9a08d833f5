"""The OpenAPI declarations of what the routes answer besides a JSON 200, in one place.

Every error leaves `serve/http/errors.py` in the OpenAI shape (`ErrorResponse`), never as FastAPI's 422 (which
`serve/http/api.py` drops from the document). Each route lists the statuses its code can send; 500 (the crash
handler) goes with every route. The helpers build fresh dicts on each call: FastAPI writes into them.
"""

from __future__ import annotations

import copy
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from serve.errors import RETRY_AFTER_S
from serve.protocol import ErrorResponse

ERROR_DESCRIPTIONS = {
    400: "Invalid request: a parameter or body field fails validation, or asks for more than this server's limits "
    "(`param` names the field). Sent instead of 422.",
    401: "Missing or unknown API key (only when API keys are configured): send `Authorization: Bearer <key>`.",
    403: "The API key is not an admin key.",
    404: "No such model, SAE, feature or plot (`code` says which, e.g. model_not_found, sae_not_found).",
    413: "The request body is larger than the server's limit (`limits.max_body_bytes`).",
    500: "Internal server error (logged by the service).",
    503: "The model or its engine is unavailable (restarting) or the service is overloaded; retry after "
    "`Retry-After` seconds.",
}

_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}}},
    503: {
        "Retry-After": {
            "description": f"Seconds to wait before retrying (usually {RETRY_AFTER_S}).",
            "schema": {"type": "integer"},
        }
    },
}

SSE_DESCRIPTION = (
    "With stream=false: this object as JSON. With stream=true: server-sent events "
    "(`text/event-stream`), each `data:` a chunk of this object, ending with `data: [DONE]`; an error "
    'after the stream has started arrives as a last event `data: {"error": {...}}`.'
)
SSE_EVENTS = "Server-sent events: `data: <chunk JSON>` lines, ending with `data: [DONE]`."
PROMETHEUS_DESCRIPTION = f"Prometheus text exposition format (`{CONTENT_TYPE_LATEST}`)."


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, each with the `ErrorResponse` schema; 500 is always added."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, 500}):
        if status not in ERROR_DESCRIPTIONS:
            raise ValueError(f"no error response declared for status {status}")
        entry: dict[str, Any] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        if status in _ERROR_HEADERS:
            entry["headers"] = copy.deepcopy(_ERROR_HEADERS[status])
        out[status] = entry
    return out


def json_or_sse(model: type) -> dict[int | str, dict[str, Any]]:
    """The 200 of an endpoint that answers `model` as JSON, or with stream=true as server-sent events."""
    # The event stream's schema is left open: before OpenAPI 3.2 tools disagree on whether `schema` describes the
    # whole body (a string) or each event (an object), and the chunks' shape is given by the JSON schema.
    return {
        200: {
            "model": model,
            "description": SSE_DESCRIPTION,
            "content": {"text/event-stream": {"schema": {"description": SSE_EVENTS}}},
        }
    }


def prometheus_text() -> dict[int | str, dict[str, Any]]:
    """The 200 of GET /metrics (with `response_class=Response`, so that no JSON content is declared)."""
    return {
        200: {
            "description": PROMETHEUS_DESCRIPTION,
            "content": {"text/plain": {"schema": {"type": "string", "description": PROMETHEUS_DESCRIPTION}}},
        }
    }


def png() -> dict[int | str, dict[str, Any]]:
    """The 200 of a PNG plot (with `response_class=Response`)."""
    return {200: {"description": "The PNG image.", "content": {"image/png": {}}}}
