"""/v1/saes endpoints; loading and unloading need an admin key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from .. import sae_serving
from ..ingress_context import IngressContext
from ..protocol import FeatureCard, FeatureList, RegistryStatus, SAECard, SAEDeleted, SAEInfo, SAEList, SAELoadRequest
from .deps import get_ctx, require_admin, require_user

router = APIRouter(dependencies=[Depends(require_user)])


@router.get("/v1/saes", response_model=SAEList)
async def list_saes(ctx: IngressContext = Depends(get_ctx)) -> SAEList:
    return await sae_serving.list_saes(ctx)


@router.get("/v1/saes/{sae_id}", response_model=SAECard)
async def sae_card(sae_id: str, ctx: IngressContext = Depends(get_ctx)) -> SAECard:
    return await sae_serving.sae_card(ctx, sae_id)


@router.get("/v1/saes/{sae_id}/features", response_model=FeatureList)
async def feature_list(sae_id: str,
                       q: str = Query(default="", max_length=200, description="Feature index, or text to find."),
                       limit: int = Query(default=50, ge=1, le=100_000, description="Summaries per page."),
                       offset: int = Query(default=0, ge=0, description="Matches to skip."),
                       ctx: IngressContext = Depends(get_ctx)) -> FeatureList:
    return await sae_serving.feature_list(ctx, sae_id, q, limit, offset)


@router.get("/v1/saes/{sae_id}/plots/{name}", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
async def sae_plot(sae_id: str, name: str, ctx: IngressContext = Depends(get_ctx)) -> Response:
    return Response(await sae_serving.sae_plot(ctx, sae_id, name), media_type="image/png")


@router.get("/v1/saes/{sae_id}/features/{feature}", response_model=FeatureCard)
async def feature_card(sae_id: str, feature: int, top_n: int = Query(default=10, description="Tokens per side."),
                       ctx: IngressContext = Depends(get_ctx)) -> FeatureCard:
    return await sae_serving.feature_card(ctx, sae_id, feature, top_n)


@router.post("/v1/saes", response_model=SAEInfo, dependencies=[Depends(require_admin)])
async def load_sae(req: SAELoadRequest, ctx: IngressContext = Depends(get_ctx)) -> SAEInfo:
    return await sae_serving.load_sae(ctx, req)


@router.delete("/v1/saes/{sae_id}", response_model=SAEDeleted, dependencies=[Depends(require_admin)])
async def unload_sae(sae_id: str, ctx: IngressContext = Depends(get_ctx)) -> SAEDeleted:
    return await sae_serving.unload_sae(ctx, sae_id)


@router.get("/v1/registry", response_model=RegistryStatus)
async def registry_status(ctx: IngressContext = Depends(get_ctx)) -> RegistryStatus:
    """What became of each SAE the trainer published into the registry (loaded, rejected with why, pending)."""
    return await sae_serving.registry_status(ctx)
