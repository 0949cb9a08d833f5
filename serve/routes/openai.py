"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .. import openai_serving
from ..ingress_context import IngressContext
from ..protocol import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ModelCard, ModelList
from .deps import get_ctx, require_user

router = APIRouter(dependencies=[Depends(require_user)])


@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: IngressContext = Depends(get_ctx)) -> ModelList:
    return ModelList(data=[ModelCard(id=ctx.config.served_model_name, created=ctx.created)])


# Documented only (the body is JSON or, with stream=true, SSE): clients and the SDK's contract test read these schemas.
_SSE = "With stream=true: server-sent events of these objects (chunks), ending with `data: [DONE]`."


@router.post("/v1/completions", responses={200: {"model": Completion, "description": _SSE}})
async def completions(req: CompletionRequest, ctx: IngressContext = Depends(get_ctx)):
    return await openai_serving.create_completion(ctx, req)


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletion, "description": _SSE}})
async def chat_completions(req: ChatCompletionRequest, ctx: IngressContext = Depends(get_ctx)):
    return await openai_serving.create_chat_completion(ctx, req)
