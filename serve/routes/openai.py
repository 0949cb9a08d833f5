"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .. import openai_serving
from ..ingress_context import IngressContext
from ..protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .deps import get_ctx, require_user

router = APIRouter(dependencies=[Depends(require_user)])


@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: IngressContext = Depends(get_ctx)) -> ModelList:
    return ModelList(data=[ModelCard(id=ctx.config.served_model_name, created=ctx.created)])


@router.post("/v1/completions")
async def completions(req: CompletionRequest, ctx: IngressContext = Depends(get_ctx)):
    return await openai_serving.create_completion(ctx, req)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, ctx: IngressContext = Depends(get_ctx)):
    return await openai_serving.create_chat_completion(ctx, req)
