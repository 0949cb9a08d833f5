"""The ingress's FastAPI application: routers, OpenAI-shaped errors, body-size limit, request metrics.

`create_api` needs no Ray, so the HTTP layer can run against any object with ReplicaClient's methods.
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from serve.errors import PayloadTooLarge
from serve.http.context import IngressContext
from serve.http.errors import error_body, error_type, install_error_handlers
from serve.http.routes import activations, openai, ops, saes, ui


class RequestObserver:
    """Pure ASGI middleware (streams pass through untouched): counts, errors and latency until the last byte;
    bodies above the size limit are refused with 413 before they are read."""

    def __init__(self, app, ctx: IngressContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics, limit = self.ctx.metrics, self.ctx.config.limits.max_body_bytes
        start = time.perf_counter()
        state = {"status": 500, "recorded": False, "received": 0}

        def record() -> None:
            if state["recorded"]:
                return
            state["recorded"] = True
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"  # raw paths would make unbounded label sets
            status = state["status"]
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            if status >= 400:
                metrics.errors.labels(endpoint, error_type(status)).inc()

        async def observed_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    # FastAPI turns anything else raised while it reads the body into a 400 "error parsing the body".
                    raise HTTPException(413, f"the request body is larger than {limit} bytes")
            return message

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            body = json.dumps(error_body(PayloadTooLarge(f"the request body is larger than {limit} bytes"))).encode()
            await observed_send(
                {"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]}
            )
            await observed_send({"type": "http.response.body", "body": body})
            return
        try:
            await self.app(scope, limited_receive, observed_send)
        finally:
            record()


# FastAPI documents a 422 on every route with parameters; validation errors leave as 400 (serve/http/errors.py).
_UNSENT_SCHEMAS = ("HTTPValidationError", "ValidationError")


def without_unsent_422(schema: dict) -> dict:
    """The OpenAPI document without FastAPI's 422 responses, and without their schemas once nothing refers to them."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in _UNSENT_SCHEMAS:  # HTTPValidationError first: it is what refers to ValidationError
        if name in components:
            held = components.pop(name)
            if f'"#/components/schemas/{name}"' in json.dumps(schema):
                components[name] = held  # still referred to
    return schema


def _install_openapi(app: FastAPI) -> None:
    generate = app.openapi  # FastAPI's: builds the document once and caches it in app.openapi_schema

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = without_unsent_422(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_api(ctx: IngressContext) -> FastAPI:
    app = FastAPI(
        title="sae-serve",
        description="OpenAI-compatible LLM serving with sparse-autoencoder steering and feature activations.",
        version="0.1.0",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (openai, activations, saes, ops, ui):
        app.include_router(module.router)
    _install_openapi(app)
    app.add_middleware(RequestObserver, ctx=ctx)
    return app
