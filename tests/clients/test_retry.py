"""The SDK's retries, SSE parsing and error mapping against a tiny local HTTP server that answers from a script
(our own client code under test; the real service cannot be made to answer 503 or 429 on demand)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clients import (
    APIConnectionError,
    AsyncSAEServeClient,
    RateLimitError,
    RetryPolicy,
    SAEServeClient,
    ServiceUnavailableError,
)

OVERLOADED = (
    503,
    {"Retry-After": "1"},
    {
        "error": {
            "message": "the service is overloaded; retry later",
            "type": "service_unavailable_error",
            "param": None,
            "code": "overloaded",
        }
    },
)
MODELS = (200, {}, {"object": "list", "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "x"}]})
FAST = RetryPolicy(max_attempts=3, backoff_base_s=0.01)


class ScriptedServer:
    """Answers each request with the next (status, headers, body) of `script`; records paths and headers."""

    def __init__(self, script: list[tuple[int, dict, object]]):
        self.script = list(script)
        self.seen: list[tuple[float, str, dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                owner.seen.append((time.monotonic(), self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, headers, body = owner.script.pop(0)
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    srv = ScriptedServer(request.param)
    yield srv
    srv.close()


@pytest.mark.parametrize("server", [[OVERLOADED, OVERLOADED, MODELS]], indirect=True)
def test_retries_503_honouring_retry_after_then_succeeds(server):
    with SAEServeClient(server.url, "sk-secret", retry=FAST) as client:
        models = client.models()
    assert models.data[0].id == "m"
    times = [t for t, _, _ in server.seen]
    assert len(times) == 3
    assert all(b - a >= 0.95 for a, b in zip(times, times[1:])), "Retry-After: 1 was not honoured"
    assert all(h["authorization"] == "Bearer sk-secret" for _, _, h in server.seen)


@pytest.mark.parametrize("server", [[OVERLOADED, OVERLOADED, OVERLOADED, MODELS]], indirect=True)
def test_attempts_are_bounded_and_the_last_error_is_raised(server):
    policy = RetryPolicy(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.05)  # the cap shortens Retry-After
    with SAEServeClient(server.url, retry=policy) as client, pytest.raises(ServiceUnavailableError) as e:
        client.models()
    assert len(server.seen) == 2
    assert (e.value.status, e.value.code, e.value.retry_after) == (503, "overloaded", 1.0)
    assert "overloaded" in e.value.message


RATE_LIMITED = (429, {}, {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}})


@pytest.mark.parametrize("server", [[RATE_LIMITED, MODELS]], indirect=True)
async def test_async_client_retries_429(server):
    async with AsyncSAEServeClient(server.url, retry=FAST) as client:
        models = await client.models()
    assert models.data[0].id == "m" and len(server.seen) == 2


@pytest.mark.parametrize("server", [[RATE_LIMITED]], indirect=True)
def test_no_retry_when_disabled(server):
    with SAEServeClient(server.url, retry=RetryPolicy(max_attempts=1)) as client, pytest.raises(RateLimitError):
        client.models()
    assert len(server.seen) == 1


@pytest.mark.parametrize("server", [[(503, {}, "upstream connect error")]], indirect=True)
def test_a_non_json_error_body_becomes_the_message(server):
    with (
        SAEServeClient(server.url, retry=RetryPolicy(max_attempts=1)) as client,
        pytest.raises(ServiceUnavailableError, match="upstream connect error"),
    ):
        client.health()


STREAM = (
    'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"}}]}\n\n'
    ": a comment line\n\n"
    'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    '"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
)


@pytest.mark.parametrize(
    "server", [[(200, {"Content-Type": "text/event-stream"}, STREAM + "data: [DONE]\n\n")]], indirect=True
)
def test_stream_parses_chunks_until_done(server):
    with SAEServeClient(server.url, model="m") as client:
        chunks = list(client.chat_stream("hi", max_tokens=4))
    assert "".join(c.text for c in chunks) == "Hello"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(server.seen) == 1  # the model was given, so no /v1/models lookup


MID_STREAM_ERROR = (
    'data: {"error":{"message":"the engine is not running; retry shortly",'
    '"type":"service_unavailable_error","param":null,"code":"engine_unavailable"}}\n\n'
)


@pytest.mark.parametrize(
    "server", [[(200, {"Content-Type": "text/event-stream"}, STREAM + MID_STREAM_ERROR)]], indirect=True
)
async def test_error_event_mid_stream_is_raised(server):
    got = []
    async with AsyncSAEServeClient(server.url, model="m") as client:
        with pytest.raises(ServiceUnavailableError, match="engine is not running") as e:
            async for chunk in client.chat_stream("hi"):
                got.append(chunk.text)
    assert got == ["Hel", "lo"] and e.value.code == "engine_unavailable"


@pytest.mark.parametrize("server", [[(200, {"Content-Type": "text/event-stream"}, STREAM)]], indirect=True)
def test_stream_cut_before_done_is_an_error(server):
    with SAEServeClient(server.url, model="m") as client, pytest.raises(APIConnectionError, match="DONE"):
        list(client.chat_stream("hi"))


def test_connection_refused_is_retried_then_raised():
    port_holder = ScriptedServer([])
    url = port_holder.url
    port_holder.close()  # nothing listens there any more
    policy = RetryPolicy(max_attempts=2, backoff_base_s=0.01)
    with SAEServeClient(url, retry=policy) as client, pytest.raises(APIConnectionError) as e:
        client.models()
    assert e.value.status is None and url in e.value.message


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(backoff_base_s=1.0, backoff_max_s=4.0)
    draws = {a: [policy.delay(a, None) for _ in range(200)] for a in (1, 2, 3, 4, 5)}
    assert max(draws[1]) <= 1.0 and max(draws[2]) <= 2.0 and max(draws[5]) <= 4.0
    assert max(draws[3]) > 2.0  # the bound really doubled (200 uniform draws below 4)
    assert len(set(draws[1])) > 100  # jittered
    assert 3.0 <= policy.delay(1, 3.0) <= 3.3 and policy.delay(1, 60.0) == 4.0
    assert not policy.retries(4, 503) and policy.retries(1, 503) and not policy.retries(1, 400)
