"""/v1/saes: list, cards, feature cards, and the admin load / unload (hot-load events are counted here)."""

from __future__ import annotations

from .errors import APIError
from .ingress_context import IngressContext
from .protocol import FeatureCard, FeatureList, RegistryStatus, SAECard, SAEDeleted, SAEInfo, SAEList, SAELoadRequest


async def list_saes(ctx: IngressContext) -> SAEList:
    saes = await ctx.model.call("saes", ctx.model.sae_version)
    ctx.metrics.loaded_saes.set(len(saes))
    return SAEList(data=[SAEInfo(**s) for s in saes])


async def refresh_loaded_gauge(ctx: IngressContext) -> None:
    """Before a scrape; keeps the last value if the model cannot answer (metrics must work while it is down)."""
    try:
        await list_saes(ctx)
    except APIError:
        pass


async def sae_card(ctx: IngressContext, sae_id: str) -> SAECard:
    return SAECard(**await ctx.model.call("sae_card", sae_id, ctx.model.sae_version))


async def feature_card(ctx: IngressContext, sae_id: str, feature: int, top_n: int) -> FeatureCard:
    if not 1 <= top_n <= ctx.config.limits.max_feature_top_n:
        raise APIError(400, f"top_n: must be in [1, {ctx.config.limits.max_feature_top_n}]", "top_n")
    return FeatureCard(**await ctx.model.call("feature", sae_id, feature, top_n, ctx.model.sae_version))


async def feature_list(ctx: IngressContext, sae_id: str, query: str, limit: int, offset: int) -> FeatureList:
    return FeatureList(**await ctx.model.call("feature_list", sae_id, query, limit, offset, ctx.model.sae_version))


async def sae_plot(ctx: IngressContext, sae_id: str, name: str) -> bytes:
    return await ctx.model.call("sae_plot", sae_id, name, ctx.model.sae_version)


async def load_sae(ctx: IngressContext, req: SAELoadRequest) -> SAEInfo:
    try:
        meta, version = await ctx.model.call("load_sae", req.path, req.id)
    except APIError:
        ctx.metrics.sae_events.labels("load", "rejected").inc()
        raise
    ctx.model.saw_version(version)
    ctx.metrics.sae_events.labels("load", "ok").inc()
    return SAEInfo(**meta)


async def unload_sae(ctx: IngressContext, sae_id: str) -> SAEDeleted:
    try:
        version = await ctx.model.call("unload_sae", sae_id)
    except APIError:
        ctx.metrics.sae_events.labels("unload", "rejected").inc()
        raise
    ctx.model.saw_version(version)
    ctx.metrics.sae_events.labels("unload", "ok").inc()
    return SAEDeleted(id=sae_id)


async def registry_status(ctx: IngressContext) -> RegistryStatus:
    return RegistryStatus(**await ctx.model.call("registry_status"))
