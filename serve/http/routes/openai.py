"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (a JSON body or an SSE stream)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from serve.errors import InvalidRequest, ServeError
from serve.http.context import IngressContext
from serve.http.errors import error_body, error_type
from serve.http.metrics import VECTOR_LABEL
from serve.http.replica_client import GenerationStream
from serve.http.routes.deps import get_ctx, require_user
from serve.http.routes.responses import errors, json_or_sse
from serve.protocol import (
    ActivationToken,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChoiceDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    SteeringReport,
    StreamItem,
    TokenLogprob,
    TopLogprob,
    Usage,
)

router = APIRouter(dependencies=[Depends(require_user)])


@router.get("/v1/models", response_model=ModelList, responses=errors(401))
async def list_models(ctx: IngressContext = Depends(get_ctx)) -> ModelList:
    return ModelList(data=[ModelCard(id=ctx.config.served_model_name, created=ctx.created)])


# Documented only (the body is JSON or, with stream=true, SSE): clients and the SDK's contract test read these schemas.
# 404: an unknown model; 503: the replica is down or overloaded (refusals before the stream starts are plain HTTP).
_GENERATION_ERRORS = (400, 401, 404, 413, 503)


@router.post("/v1/completions", responses={**json_or_sse(Completion), **errors(*_GENERATION_ERRORS)})
async def completions(req: CompletionRequest, ctx: IngressContext = Depends(get_ctx)):
    return await _create_completion(ctx, req)


@router.post("/v1/chat/completions", responses={**json_or_sse(ChatCompletion), **errors(*_GENERATION_ERRORS)})
async def chat_completions(req: ChatCompletionRequest, ctx: IngressContext = Depends(get_ctx)):
    return await _create_chat_completion(ctx, req)


# --- serving -----------------------------------------------------------------------------------------------------


def _finish(reason: str | None) -> str | None:
    # vLLM's other reasons (abort, error) never reach a finished choice here; OpenAI knows only these two.
    return None if reason is None else ("length" if reason == "length" else "stop")


def _completion_logprobs(lps: list[TokenLogprob], start: int) -> CompletionLogprobs:
    offsets, pos = [], start
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in lps],
        token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[dict(lp.top) for lp in lps],
        text_offset=offsets,
    )


def _chat_logprobs(lps: list[TokenLogprob]) -> ChatLogprobs:
    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[top(t, v) for t, v in lp.top],
            )
            for lp in lps
        ]
    )


class _Tracker:
    """Token counts and timings of one request, reported to the metrics as the stream goes."""

    def __init__(self, ctx: IngressContext, endpoint: str, steering):
        self.ctx, self.endpoint = ctx, endpoint
        self.start = time.perf_counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.steering_report: list[SteeringReport] | None = None
        self._first = True
        for sae in sorted({e.sae or VECTOR_LABEL for e in steering}):
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
        if item.steering_report is not None:
            self.steering_report = item.steering_report
            self.ctx.metrics.count_report(item.steering_report)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    def failed(self, err: ServeError) -> None:
        self.ctx.metrics.errors.labels(self.endpoint, error_type(err.status)).inc()


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def _stream_response(
    stream: GenerationStream,
    tracker: _Tracker,
    to_chunks: Callable[[StreamItem], list],
    usage_chunk: Callable[[Usage], object] | None,
) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for item in stream.items():
                tracker.seen(item)
                chunks = to_chunks(item)
                if chunks and item.steering_report is not None:
                    chunks[-1] = chunks[-1].model_copy(update={"steering_report": item.steering_report})
                if chunks:
                    yield "".join(_sse(c) for c in chunks)
            if usage_chunk is not None:
                yield _sse(usage_chunk(tracker.usage()))
            yield "data: [DONE]\n\n"
        except ServeError as e:
            # Headers are gone; OpenAI's SDK raises on an event carrying `error`.
            tracker.failed(e)
            yield f"data: {json.dumps(error_body(e))}\n\n"
        finally:
            stream.close()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _collect(stream: GenerationStream, tracker: _Tracker, n: int):
    """Whole texts, logprobs, finish reasons and live features (None where not asked) of the n choices of a
    non-streaming request."""
    texts = [""] * n
    lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    features: list[list[ActivationToken] | None] = [None] * n
    try:
        async for item in stream.items():
            tracker.seen(item)
            for d in item.deltas:
                texts[d.index] += d.text
                lps[d.index] += d.logprobs or []
                finish[d.index] = d.finish_reason or finish[d.index]
                if d.features is not None:
                    features[d.index] = (features[d.index] or []) + d.features
    finally:
        stream.close()
    return texts, lps, finish, features


async def _create_completion(ctx: IngressContext, req: CompletionRequest):
    ctx.check_model(req.model)
    limits = ctx.config.limits
    ctx.check_at_most(req.n, limits.max_n, "n")
    ctx.check_at_most(req.max_tokens, limits.max_tokens, "max_tokens")
    ctx.check_at_most(req.logprobs, limits.max_logprobs, "logprobs")
    tracker = _Tracker(ctx, "/v1/completions", req.steering)
    stream = await ctx.replica.generate(req)
    response = Completion(model=ctx.config.served_model_name, choices=[])
    offsets = [0] * req.n

    def choice(d: ChoiceDelta) -> CompletionChoice:
        lp = _completion_logprobs(d.logprobs, offsets[d.index]) if d.logprobs is not None else None
        offsets[d.index] += len(d.text)
        return CompletionChoice(
            index=d.index, text=d.text, logprobs=lp, finish_reason=_finish(d.finish_reason), features=d.features
        )

    if req.stream:

        def to_chunks(item: StreamItem) -> list:
            return [response.model_copy(update={"choices": [choice(d)]}) for d in item.deltas]

        usage = (lambda u: response.model_copy(update={"usage": u})) if req.include_usage() else None
        return _stream_response(stream, tracker, to_chunks, usage)

    texts, lps, finish, features = await _collect(stream, tracker, req.n)
    response.choices = [
        CompletionChoice(
            index=i,
            text=texts[i],
            finish_reason=_finish(finish[i]),
            logprobs=_completion_logprobs(lps[i], 0) if req.logprobs is not None else None,
            features=features[i],
        )
        for i in range(req.n)
    ]
    response.usage = tracker.usage()
    response.steering_report = tracker.steering_report
    return JSONResponse(response.model_dump())


async def _create_chat_completion(ctx: IngressContext, req: ChatCompletionRequest):
    ctx.check_model(req.model)
    limits = ctx.config.limits
    ctx.check_at_most(req.n, limits.max_n, "n")
    ctx.check_at_most(req.output_limit(), limits.max_tokens, req.max_tokens_param())
    ctx.check_at_most(req.top_logprobs, limits.max_logprobs, "top_logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs: logprobs must be true when top_logprobs is set", "top_logprobs")
    tracker = _Tracker(ctx, "/v1/chat/completions", req.steering)
    stream = await ctx.replica.generate(req)
    model = ctx.config.served_model_name

    if req.stream:
        head = ChatCompletionChunk(
            id=ChatCompletion(model=model, choices=[]).id, created=int(time.time()), model=model, choices=[]
        )
        started: set[int] = set()

        def to_chunks(item: StreamItem) -> list:
            chunks = []
            for d in item.deltas:
                role = None if d.index in started else "assistant"
                started.add(d.index)
                lp = _chat_logprobs(d.logprobs) if d.logprobs is not None else None
                delta = ChatDelta(role=role, content=d.text)
                c = ChatChunkChoice(
                    index=d.index, delta=delta, logprobs=lp, finish_reason=_finish(d.finish_reason), features=d.features
                )
                chunks.append(head.model_copy(update={"choices": [c]}))
            return chunks

        usage = (lambda u: head.model_copy(update={"usage": u})) if req.include_usage() else None
        return _stream_response(stream, tracker, to_chunks, usage)

    texts, lps, finish, features = await _collect(stream, tracker, req.n)
    response = ChatCompletion(
        model=model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content=texts[i]),
                finish_reason=_finish(finish[i]),
                logprobs=_chat_logprobs(lps[i]) if req.logprobs else None,
                features=features[i],
            )
            for i in range(req.n)
        ],
        usage=tracker.usage(),
        steering_report=tracker.steering_report,
    )
    return JSONResponse(response.model_dump())
