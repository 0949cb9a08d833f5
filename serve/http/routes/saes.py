"""/v1/saes and /v1/registry: list, cards, feature cards, plots, and the admin load / unload (hot-load events are
counted here)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from serve.errors import InvalidRequest, ServeError
from serve.http.context import IngressContext
from serve.http.routes.deps import get_ctx, require_admin, require_user
from serve.http.routes.responses import errors, png
from serve.protocol import (
    FeatureCard,
    FeatureList,
    RegistryStatus,
    SAECard,
    SAEDeleted,
    SAEInfo,
    SAEList,
    SAELoadRequest,
)

router = APIRouter(dependencies=[Depends(require_user)])


async def refresh_loaded_gauge(ctx: IngressContext) -> None:
    """Before a scrape; keeps the last value if the model cannot answer (metrics must work while it is down)."""
    try:
        ctx.metrics.served_saes(await ctx.replica.saes())
    except ServeError:
        pass


@router.get("/v1/saes", response_model=SAEList, responses=errors(401, 503))
async def list_saes(ctx: IngressContext = Depends(get_ctx)) -> SAEList:
    saes = await ctx.replica.saes()
    ctx.metrics.served_saes(saes)
    return SAEList(data=saes)


@router.get("/v1/saes/{sae_id}", response_model=SAECard, responses=errors(401, 404, 503))
async def sae_card(sae_id: str, ctx: IngressContext = Depends(get_ctx)) -> SAECard:
    return await ctx.replica.sae_card(sae_id)


@router.get("/v1/saes/{sae_id}/features", response_model=FeatureList, responses=errors(400, 401, 404, 503))
async def feature_list(
    sae_id: str,
    q: str = Query(default="", max_length=200, description="Feature index, or text to find."),
    limit: int = Query(default=50, ge=1, le=100_000, description="Summaries per page."),
    offset: int = Query(default=0, ge=0, description="Matches to skip."),
    ctx: IngressContext = Depends(get_ctx),
) -> FeatureList:
    return await ctx.replica.feature_list(sae_id, q, limit, offset)


@router.get("/v1/saes/{sae_id}/plots/{name}", response_class=Response, responses={**png(), **errors(401, 404, 503)})
async def sae_plot(sae_id: str, name: str, ctx: IngressContext = Depends(get_ctx)) -> Response:
    return Response(await ctx.replica.sae_plot(sae_id, name), media_type="image/png")


@router.get("/v1/saes/{sae_id}/features/{feature}", response_model=FeatureCard, responses=errors(400, 401, 404, 503))
async def feature_card(
    sae_id: str,
    feature: int,
    top_n: int = Query(default=10, description="Tokens per side."),
    ctx: IngressContext = Depends(get_ctx),
) -> FeatureCard:
    if not 1 <= top_n <= ctx.config.limits.max_feature_top_n:
        raise InvalidRequest(f"top_n: must be in [1, {ctx.config.limits.max_feature_top_n}]", "top_n")
    return await ctx.replica.feature(sae_id, feature, top_n)


@router.post(
    "/v1/saes", response_model=SAEInfo, dependencies=[Depends(require_admin)], responses=errors(400, 401, 403, 413, 503)
)
async def load_sae(req: SAELoadRequest, ctx: IngressContext = Depends(get_ctx)) -> SAEInfo:
    try:
        info = await ctx.replica.load_sae(req.path, req.id)
    except ServeError:
        ctx.metrics.sae_events.labels("load", "rejected").inc()
        raise
    ctx.metrics.sae_events.labels("load", "ok").inc()
    return info


@router.delete(
    "/v1/saes/{sae_id}",
    response_model=SAEDeleted,
    dependencies=[Depends(require_admin)],
    responses=errors(401, 403, 404, 503),
)
async def unload_sae(sae_id: str, ctx: IngressContext = Depends(get_ctx)) -> SAEDeleted:
    try:
        await ctx.replica.unload_sae(sae_id)
    except ServeError:
        ctx.metrics.sae_events.labels("unload", "rejected").inc()
        raise
    ctx.metrics.sae_events.labels("unload", "ok").inc()
    return SAEDeleted(id=sae_id)


@router.get("/v1/registry", response_model=RegistryStatus, responses=errors(401, 503))
async def registry_status(ctx: IngressContext = Depends(get_ctx)) -> RegistryStatus:
    """What became of each SAE the trainer published into the registry (loaded, rejected with why, pending)."""
    return await ctx.replica.registry_status()
