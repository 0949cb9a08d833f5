"""The ingress's FastAPI application: routers, OpenAI-shaped errors, body-size limit, request metrics.

`create_api` needs no Ray, so the HTTP layer can run against any object with ReplicaClient's methods.
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from serve.errors import PayloadTooLarge
from serve.http.errors import error_body, error_type, install_error_handlers
from serve.http.context import IngressContext
from serve.http.routes import activations, ops, openai, saes, ui


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
            await observed_send({"type": "http.response.start", "status": 413,
                                 "headers": [(b"content-type", b"application/json")]})
            await observed_send({"type": "http.response.body", "body": body})
            return
        try:
            await self.app(scope, limited_receive, observed_send)
        finally:
            record()


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
    app.add_middleware(RequestObserver, ctx=ctx)
    return app
