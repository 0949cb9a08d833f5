"""SAEServeClient (sync) and AsyncSAEServeClient over httpx: typed calls, streams, retries, the service's errors.

Both share every endpoint method (defined once in `_Endpoints`); on the async client each method returns an
awaitable, and the `*_stream` methods an async iterator.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx

from .calls import Call, without_none
from .errors import APIConnectionError, SAEServeError, error_from_body, parse_retry_after
from .request_models import ChatMessage, SteeringEntry
from .retry import RetryPolicy
from .sse import DONE, SSEDecoder

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "SAE_SERVE_URL"
KEY_ENV = "SAE_SERVE_API_KEY"

Messages = str | Sequence[ChatMessage | dict[str, Any]]
Steering = Sequence[SteeringEntry | dict[str, Any] | str]

# Nothing was sent when these happen, so any request may be repeated.
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


def _messages(messages: Messages) -> list[Any]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def _steering(steering: Steering) -> list[Any]:
    return [SteeringEntry.parse(s) if isinstance(s, str) else s for s in steering]


def _response_error(response: httpx.Response) -> SAEServeError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_body(response.status_code, body, parse_retry_after(response.headers.get("retry-after")))


def _connection_error(e: httpx.TransportError, base_url: str) -> APIConnectionError:
    return APIConnectionError(f"no response from {base_url}: {type(e).__name__}: {e}", type="connection_error")


def _cut_stream() -> APIConnectionError:
    return APIConnectionError("the stream ended before data: [DONE]", type="connection_error")


class _Attempts:
    """The retry bookkeeping of one call: `failed` gives the wait before the next attempt or raises."""

    def __init__(self, policy: RetryPolicy):
        self._policy = policy
        self._attempt = 0

    def failed(self, error: SAEServeError) -> float:
        self._attempt += 1
        if not self._policy.retries(self._attempt, error.status):
            raise error
        return self._policy.delay(self._attempt, error.retry_after)


class _Endpoints:
    """The endpoint methods; subclasses provide `_run` (one JSON call) and `_stream` (SSE events)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
    ):
        """base_url / api_key default to $SAE_SERVE_URL (else http://127.0.0.1:8000) / $SAE_SERVE_API_KEY;
        `model` is looked up from /v1/models on first use when not given."""
        self.base_url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get(KEY_ENV)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        self._retry = retry or RetryPolicy()
        self.model = model

    def __repr__(self) -> str:
        # Never the key.
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    def _run(self, call: Call):
        """The parsed response of one call (a coroutine on the async client)."""
        raise NotImplementedError

    def _stream(self, call: Call):
        """An iterator of the call's parsed server-sent events (async on the async client)."""
        raise NotImplementedError

    def models(self):
        """GET /v1/models -> ModelList."""
        return self._run(Call.of("models"))

    def health(self):
        """GET /health -> HealthResponse (raises ServiceUnavailableError once retries are spent)."""
        return self._run(Call.of("health"))

    def chat(
        self,
        messages: Messages,
        *,
        steering: Steering = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        model: str | None = None,
        **options: Any,
    ):
        """POST /v1/chat/completions -> ChatCompletion. `messages` is a user turn's text or a list of messages;
        `steering` entries may be SteeringEntry, dicts or 'SAE:FEATURE[@OP]=VALUE' strings; `options` are other
        fields of ChatRequest (top_p, seed, stop, n, logprobs, ...)."""
        return self._run(self._chat_call(messages, steering, max_tokens, temperature, model, options))

    def chat_stream(
        self,
        messages: Messages,
        *,
        steering: Steering = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        model: str | None = None,
        **options: Any,
    ):
        """As `chat`, streamed: an iterator of ChatCompletionChunk until [DONE]."""
        return self._stream(
            self._chat_call(messages, steering, max_tokens, temperature, model, {**options, "stream": True})
        )

    def complete(
        self,
        prompt: str | list[int],
        *,
        steering: Steering = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        model: str | None = None,
        **options: Any,
    ):
        """POST /v1/completions -> Completion; `options` are other fields of CompletionRequest."""
        return self._run(self._complete_call(prompt, steering, max_tokens, temperature, model, options))

    def complete_stream(
        self,
        prompt: str | list[int],
        *,
        steering: Steering = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        model: str | None = None,
        **options: Any,
    ):
        """As `complete`, streamed: an iterator of Completion chunks until [DONE]."""
        return self._stream(
            self._complete_call(prompt, steering, max_tokens, temperature, model, {**options, "stream": True})
        )

    def activations(
        self,
        input: str | None = None,
        *,
        saes: Sequence[str],
        messages: Messages | None = None,
        top_k: int | None = None,
        features: dict[str, list[int]] | None = None,
        max_tokens: int | None = None,
        steering: Steering = (),
        **options: Any,
    ):
        """POST /v1/activations -> ActivationsResponse: per-token top features (and `features`) at each SAE of
        `saes`, for `input` text or `messages`; `max_tokens` > 0 continues the text and reads the new tokens too."""
        body = without_none(
            input=input,
            messages=None if messages is None else _messages(messages),
            saes=list(saes),
            top_k=top_k,
            features=features,
            max_tokens=max_tokens,
            **options,
        )
        return self._run(Call.of("activations", body={**body, "steering": _steering(steering)}))

    def saes(self):
        """GET /v1/saes -> SAEList of the loaded SAEs."""
        return self._run(Call.of("saes"))

    def sae(self, sae_id: str):
        """GET /v1/saes/{sae_id} -> SAECard."""
        return self._run(Call.of("sae", path={"sae_id": sae_id}))

    def feature(self, sae_id: str, feature: int, *, top_n: int | None = None):
        """GET /v1/saes/{sae_id}/features/{feature} -> FeatureCard (logit lens, density, top contexts)."""
        return self._run(
            Call.of("feature", path={"sae_id": sae_id, "feature": feature}, query=without_none(top_n=top_n))
        )

    def load_sae(self, path: str, *, id: str | None = None):
        """POST /v1/saes (admin key) -> SAEInfo: load a folder of the service's registry on every replica."""
        return self._run(Call.of("load_sae", body=without_none(path=path, id=id)))

    def unload_sae(self, sae_id: str):
        """DELETE /v1/saes/{sae_id} (admin key) -> SAEDeleted."""
        return self._run(Call.of("unload_sae", path={"sae_id": sae_id}))

    @staticmethod
    def _chat_call(messages, steering, max_tokens, temperature, model, options) -> Call:
        body = without_none(
            messages=_messages(messages),
            max_completion_tokens=max_tokens,
            temperature=temperature,
            model=model,
            **options,
        )
        return Call.of("chat", body={**body, "steering": _steering(steering)})

    @staticmethod
    def _complete_call(prompt, steering, max_tokens, temperature, model, options) -> Call:
        body = without_none(prompt=prompt, max_tokens=max_tokens, temperature=temperature, model=model, **options)
        return Call.of("complete", body={**body, "steering": _steering(steering)})

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call, model: str | None) -> httpx.Request:
        return http.build_request(call.route.method, call.path(), json=call.json(model), params=call.query)


class SAEServeClient(_Endpoints):
    """Synchronous client; use as a context manager or call `close()`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, **kwargs: Any):
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout)

    def __enter__(self) -> SAEServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _served_model(self, call: Call) -> str | None:
        if call.route.needs_model and not (call.body or {}).get("model") and self.model is None:
            self.model = self.models().data[0].id
        return self.model

    def _send(self, call: Call) -> httpx.Response:
        request = self._request(self._http, call, self._served_model(call))
        attempts = _Attempts(self._retry)
        while True:
            try:
                response = self._http.send(request, stream=call.streams)
            except _CONNECT_ERRORS as e:
                time.sleep(attempts.failed(_connection_error(e, self.base_url)))
                continue
            except httpx.TransportError as e:
                raise _connection_error(e, self.base_url) from e
            if response.is_success:
                return response
            response.read()
            response.close()
            time.sleep(attempts.failed(_response_error(response)))

    def _run(self, call: Call):
        return call.parse(self._send(call).json())

    def _stream(self, call: Call) -> Iterator:
        response = self._send(call)
        decoder = SSEDecoder()
        try:
            for line in response.iter_lines():
                if (event := decoder.feed(line)) is DONE:
                    return
                if event is not None:
                    yield call.parse_chunk(event)
        except httpx.TransportError as e:
            raise _connection_error(e, self.base_url) from e
        finally:
            response.close()
        raise _cut_stream()


class AsyncSAEServeClient(_Endpoints):
    """Asyncio client: `await client.chat(...)`, `async for chunk in client.chat_stream(...)`; use as an async
    context manager or `await close()`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, **kwargs: Any):
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)

    async def __aenter__(self) -> AsyncSAEServeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _served_model(self, call: Call) -> str | None:
        if call.route.needs_model and not (call.body or {}).get("model") and self.model is None:
            self.model = (await self.models()).data[0].id
        return self.model

    async def _send(self, call: Call) -> httpx.Response:
        request = self._request(self._http, call, await self._served_model(call))
        attempts = _Attempts(self._retry)
        while True:
            try:
                response = await self._http.send(request, stream=call.streams)
            except _CONNECT_ERRORS as e:
                await asyncio.sleep(attempts.failed(_connection_error(e, self.base_url)))
                continue
            except httpx.TransportError as e:
                raise _connection_error(e, self.base_url) from e
            if response.is_success:
                return response
            await response.aread()
            await response.aclose()
            await asyncio.sleep(attempts.failed(_response_error(response)))

    async def _run(self, call: Call):
        return call.parse((await self._send(call)).json())

    async def _stream(self, call: Call) -> AsyncIterator:
        response = await self._send(call)
        decoder = SSEDecoder()
        try:
            async for line in response.aiter_lines():
                if (event := decoder.feed(line)) is DONE:
                    return
                if event is not None:
                    yield call.parse_chunk(event)
        except httpx.TransportError as e:
            raise _connection_error(e, self.base_url) from e
        finally:
            await response.aclose()
        raise _cut_stream()
