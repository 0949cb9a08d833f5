"""POST /v1/activations: per-token SAE features of a text or chat, optionally with a continuation."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from serve.errors import InvalidRequest
from serve.http.context import IngressContext
from serve.http.metrics import VECTOR_LABEL
from serve.http.routes.deps import get_ctx, require_user
from serve.http.routes.responses import errors
from serve.protocol import ActivationsRequest, ActivationsResponse

router = APIRouter(dependencies=[Depends(require_user)])


@router.post("/v1/activations", response_model=ActivationsResponse, responses=errors(400, 401, 404, 413, 503))
async def activations(req: ActivationsRequest, ctx: IngressContext = Depends(get_ctx)) -> ActivationsResponse:
    ctx.check_model(req.model)
    if (req.input is None) == (req.messages is None):
        raise InvalidRequest("give exactly one of input and messages", "input")
    limits = ctx.config.limits
    ctx.check_at_most(req.top_k, limits.max_activation_top_k, "top_k")
    ctx.check_at_most(req.max_tokens, limits.max_tokens, "max_tokens")
    for sae in sorted({e.sae or VECTOR_LABEL for e in req.steering}):
        ctx.metrics.steered.labels(sae).inc()
    out = await ctx.replica.activations(req)
    ctx.metrics.prompt_tokens.inc(out.usage.prompt_tokens)
    ctx.metrics.generation_tokens.inc(out.usage.completion_tokens)
    if out.steering_report is not None:
        ctx.metrics.count_report(out.steering_report)
    return out
