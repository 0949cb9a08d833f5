"""GET /health (the engine answers a one-token generation) and GET /metrics (Prometheus); no key needed."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..sae_serving import refresh_loaded_gauge
from ..ingress_context import IngressContext
from ..protocol import HealthResponse
from .deps import get_ctx

router = APIRouter()


@router.get("/health", response_model=HealthResponse)
async def health(ctx: IngressContext = Depends(get_ctx)) -> HealthResponse:
    await ctx.model.call("health")
    return HealthResponse()


@router.get("/metrics")
async def metrics(ctx: IngressContext = Depends(get_ctx)) -> Response:
    await refresh_loaded_gauge(ctx)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
