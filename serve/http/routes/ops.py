"""GET /health (the engine answers a one-token generation) and GET /metrics (Prometheus); no key needed."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serve.http.context import IngressContext
from serve.http.routes.deps import get_ctx
from serve.http.routes.responses import errors, prometheus_text
from serve.http.routes.saes import refresh_loaded_gauge
from serve.protocol import HealthResponse

router = APIRouter()


@router.get("/health", response_model=HealthResponse, responses=errors(503))
async def health(ctx: IngressContext = Depends(get_ctx)) -> HealthResponse:
    await ctx.replica.health()
    return HealthResponse()


@router.get("/metrics", response_class=Response, responses={**prometheus_text(), **errors()})
async def metrics(ctx: IngressContext = Depends(get_ctx)) -> Response:
    await refresh_loaded_gauge(ctx)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
