"""/v1/activations: per-token SAE features of a text or chat, optionally with a continuation."""

from __future__ import annotations

from .calls import ActivationsCall, ActivationsOut, PromptInput
from .errors import APIError
from .ingress_context import IngressContext
from .protocol import ActivationsRequest, ActivationsResponse, Usage


async def read_activations(ctx: IngressContext, req: ActivationsRequest) -> ActivationsResponse:
    ctx.check_model(req.model)
    if (req.input is None) == (req.messages is None):
        raise APIError(400, "give exactly one of input and messages", "input")
    limits = ctx.config.limits
    ctx.check_at_most(req.top_k, limits.max_activation_top_k, "top_k")
    ctx.check_at_most(req.max_tokens, limits.max_tokens, "max_tokens")
    if req.messages is not None:
        prompt = PromptInput(messages=[m.template_dict() for m in req.messages],
                             add_generation_prompt=req.add_generation_prompt)
    else:
        prompt = PromptInput(text=req.input)
    call = ActivationsCall(prompt=prompt, saes=req.saes, top_k=req.top_k, features=req.features,
                           max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                           steering=list(req.steering), sae_version=ctx.model.sae_version)
    for sae in sorted({e.sae for e in req.steering}):
        ctx.metrics.steered.labels(sae).inc()
    out: ActivationsOut = await ctx.model.call("activations", call)
    ctx.metrics.prompt_tokens.inc(out.prompt_tokens)
    ctx.metrics.generation_tokens.inc(out.completion_tokens)
    return ActivationsResponse(
        model=ctx.config.served_model_name, saes=req.saes, text=out.text, generated_text=out.generated_text,
        tokens=out.tokens,
        usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                    total_tokens=out.prompt_tokens + out.completion_tokens),
    )
