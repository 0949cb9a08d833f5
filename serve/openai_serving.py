"""/v1/completions and /v1/chat/completions: OpenAI request -> GenerateCall -> JSON body or SSE stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi.responses import JSONResponse, StreamingResponse

from .calls import ChoiceDelta, GenerateCall, PromptInput, StreamItem, TokenLogprob
from .errors import ERROR_TYPES, APIError
from .ingress_context import IngressContext
from .model_client import GenerationStream
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    TopLogprob,
    Usage,
)


def _finish(reason: str | None) -> str | None:
    # vLLM's other reasons (abort, error) never reach a finished choice here; OpenAI knows only these two.
    return None if reason is None else ("length" if reason == "length" else "stop")


def _completion_logprobs(lps: list[TokenLogprob], start: int) -> CompletionLogprobs:
    offsets, pos = [], start
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return CompletionLogprobs(tokens=[lp.token for lp in lps], token_logprobs=[lp.logprob for lp in lps],
                              top_logprobs=[dict(lp.top) for lp in lps], text_offset=offsets)


def _chat_logprobs(lps: list[TokenLogprob]) -> ChatLogprobs:
    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    return ChatLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                         top_logprobs=[top(t, v) for t, v in lp.top])
        for lp in lps
    ])


class _Tracker:
    """Token counts and timings of one request, reported to the metrics as the stream goes."""

    def __init__(self, ctx: IngressContext, endpoint: str, steering):
        self.ctx, self.endpoint = ctx, endpoint
        self.start = time.perf_counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._first = True
        for sae in sorted({e.sae for e in steering}):
            ctx.metrics.steered.labels(sae).inc()

    def seen(self, item: StreamItem) -> None:
        if self._first:
            self.prompt_tokens = item.prompt_tokens
            self.ctx.metrics.prompt_tokens.inc(item.prompt_tokens)
        new = sum(d.num_tokens for d in item.deltas)
        if new and self._first:
            self.ctx.metrics.ttft.labels(self.endpoint).observe(time.perf_counter() - self.start)
            self._first = False
        self.completion_tokens += new
        self.ctx.metrics.generation_tokens.inc(new)

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)

    def failed(self, err: APIError) -> None:
        self.ctx.metrics.errors.labels(self.endpoint, ERROR_TYPES.get(err.status, "server_error")).inc()


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def _stream_response(stream: GenerationStream, tracker: _Tracker, to_chunks: Callable[[StreamItem], list],
                     usage_chunk: Callable[[Usage], object] | None) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for item in stream.items():
                tracker.seen(item)
                chunks = to_chunks(item)
                if chunks:
                    yield "".join(_sse(c) for c in chunks)
            if usage_chunk is not None:
                yield _sse(usage_chunk(tracker.usage()))
            yield "data: [DONE]\n\n"
        except APIError as e:
            # Headers are gone; OpenAI's SDK raises on an event carrying `error`.
            tracker.failed(e)
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            stream.close()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _collect(stream: GenerationStream, tracker: _Tracker, n: int):
    """Whole texts, logprobs and finish reasons of the n choices of a non-streaming request."""
    texts = [""] * n
    lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    try:
        async for item in stream.items():
            tracker.seen(item)
            for d in item.deltas:
                texts[d.index] += d.text
                lps[d.index] += d.logprobs or []
                finish[d.index] = d.finish_reason or finish[d.index]
    finally:
        stream.close()
    return texts, lps, finish


def _sampling_fields(req, max_tokens: int | None, logprobs: int | None, ctx: IngressContext) -> dict:
    return {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
            "stop": req.stop_tuple(), "n": req.n, "logprobs": logprobs, "steering": list(req.steering),
            "stream": req.stream, "sae_version": ctx.model.sae_version}


async def create_completion(ctx: IngressContext, req: CompletionRequest):
    ctx.check_model(req.model)
    limits = ctx.config.limits
    ctx.check_at_most(req.n, limits.max_n, "n")
    ctx.check_at_most(req.max_tokens, limits.max_tokens, "max_tokens")
    ctx.check_at_most(req.logprobs, limits.max_logprobs, "logprobs")
    prompt = PromptInput(text=req.prompt) if isinstance(req.prompt, str) else PromptInput(token_ids=req.prompt)
    call = GenerateCall(prompt=prompt, **_sampling_fields(req, req.max_tokens, req.logprobs, ctx))
    tracker = _Tracker(ctx, "/v1/completions", req.steering)
    stream = await ctx.model.stream(call, "prompt", "max_tokens")
    response = Completion(model=ctx.config.served_model_name, choices=[])
    offsets = [0] * req.n

    def choice(d: ChoiceDelta) -> CompletionChoice:
        lp = _completion_logprobs(d.logprobs, offsets[d.index]) if d.logprobs is not None else None
        offsets[d.index] += len(d.text)
        return CompletionChoice(index=d.index, text=d.text, logprobs=lp, finish_reason=_finish(d.finish_reason))

    if req.stream:
        def to_chunks(item: StreamItem) -> list:
            return [response.model_copy(update={"choices": [choice(d)]}) for d in item.deltas]

        usage = (lambda u: response.model_copy(update={"usage": u})) if req.include_usage() else None
        return _stream_response(stream, tracker, to_chunks, usage)

    texts, lps, finish = await _collect(stream, tracker, req.n)
    response.choices = [
        CompletionChoice(index=i, text=texts[i], finish_reason=_finish(finish[i]),
                         logprobs=_completion_logprobs(lps[i], 0) if req.logprobs is not None else None)
        for i in range(req.n)
    ]
    response.usage = tracker.usage()
    return JSONResponse(response.model_dump())


async def create_chat_completion(ctx: IngressContext, req: ChatCompletionRequest):
    ctx.check_model(req.model)
    limits = ctx.config.limits
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    ctx.check_at_most(req.n, limits.max_n, "n")
    ctx.check_at_most(req.output_limit(), limits.max_tokens, max_param)
    ctx.check_at_most(req.top_logprobs, limits.max_logprobs, "top_logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: logprobs must be true when top_logprobs is set", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    prompt = PromptInput(messages=[m.template_dict() for m in req.messages])
    call = GenerateCall(prompt=prompt, **_sampling_fields(req, req.output_limit(), logprobs, ctx))
    tracker = _Tracker(ctx, "/v1/chat/completions", req.steering)
    stream = await ctx.model.stream(call, "messages", max_param)
    model = ctx.config.served_model_name

    if req.stream:
        head = ChatCompletionChunk(id=ChatCompletion(model=model, choices=[]).id, created=int(time.time()),
                                   model=model, choices=[])
        started: set[int] = set()

        def to_chunks(item: StreamItem) -> list:
            chunks = []
            for d in item.deltas:
                role = None if d.index in started else "assistant"
                started.add(d.index)
                lp = _chat_logprobs(d.logprobs) if d.logprobs is not None else None
                delta = ChatDelta(role=role, content=d.text)
                c = ChatChunkChoice(index=d.index, delta=delta, logprobs=lp, finish_reason=_finish(d.finish_reason))
                chunks.append(head.model_copy(update={"choices": [c]}))
            return chunks

        usage = (lambda u: head.model_copy(update={"usage": u})) if req.include_usage() else None
        return _stream_response(stream, tracker, to_chunks, usage)

    texts, lps, finish = await _collect(stream, tracker, req.n)
    response = ChatCompletion(
        model=model,
        choices=[ChatChoice(index=i, message=ChatResponseMessage(content=texts[i]), finish_reason=_finish(finish[i]),
                            logprobs=_chat_logprobs(lps[i]) if req.logprobs else None)
                 for i in range(req.n)],
        usage=tracker.usage(),
    )
    return JSONResponse(response.model_dump())
