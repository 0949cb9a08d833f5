"""POST /v1/activations."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..activations_serving import read_activations
from ..ingress_context import IngressContext
from ..protocol import ActivationsRequest, ActivationsResponse
from .deps import get_ctx, require_user

router = APIRouter(dependencies=[Depends(require_user)])


@router.post("/v1/activations", response_model=ActivationsResponse)
async def activations(req: ActivationsRequest, ctx: IngressContext = Depends(get_ctx)) -> ActivationsResponse:
    return await read_activations(ctx, req)
