"""/v1/saes endpoints; loading and unloading need an admin key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from .. import sae_serving
from ..ingress_context import IngressContext
from ..protocol import FeatureCard, SAECard, SAEDeleted, SAEInfo, SAEList, SAELoadRequest
from .deps import get_ctx, require_admin, require_user

router = APIRouter(dependencies=[Depends(require_user)])


@router.get("/v1/saes", response_model=SAEList)
async def list_saes(ctx: IngressContext = Depends(get_ctx)) -> SAEList:
    return await sae_serving.list_saes(ctx)


@router.get("/v1/saes/{sae_id}", response_model=SAECard)
async def sae_card(sae_id: str, ctx: IngressContext = Depends(get_ctx)) -> SAECard:
    return await sae_serving.sae_card(ctx, sae_id)


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
