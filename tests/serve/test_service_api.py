"""The ingress's HTTP layer without Ray or vLLM: FastAPI's TestClient in front of a scripted model deployment.

Covers what the end-to-end tests cannot provoke cheaply: overload and a dead model, errors in the middle of a
stream, SSE framing, limits, key handling, and the no-keys binding rule.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from serve.config import AuthConfig, ServiceConfig
from serve.errors import EngineUnavailable, ModelUnavailable, ServeError, SpecError
from serve.http.api import create_api
from serve.http.auth import KeyStore
from serve.http.context import IngressContext
from serve.http.metrics import ServiceMetrics
from serve.http.replica_client import ReplicaClient
from serve.launch.app import check_binding
from serve.protocol import ChoiceDelta, SAEInfo, StreamItem, TokenLogprob

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

MODEL = "SmolLM2-135M-Instruct"


class ScriptedModel:
    """Stands in for SAEModel: generation yields three tokens; `fail` makes calls raise."""

    def __init__(self):
        self.fail: BaseException | None = None
        self.fail_after_first = False
        self.cancelled = 0
        self.calls: list = []

    async def generate(self, req, sae_version):
        self.calls.append(req)
        if self.fail is not None:
            raise self.fail
        top_n = req.top_logprobs_count()
        lp = [TokenLogprob("a", -0.5, [("a", -0.5), ("b", -1.5)])] if top_n is not None else None
        for i, text in enumerate([" one", " two", " three"]):
            if i == 1 and self.fail_after_first:
                raise EngineUnavailable()
            deltas = [ChoiceDelta(c, text, 1, lp, "length" if i == 2 else None) for c in range(req.n)]
            yield StreamItem(prompt_tokens=4, deltas=deltas, finished=i == 2)

    async def saes(self, version):
        return [
            SAEInfo(id="toy", hook_point="blocks.1.resid_post", architecture="relu", d_in=8, d_sae=16, version="v1")
        ]

    async def health(self):
        if self.fail is not None:
            raise self.fail


def as_ray_raises(e: BaseException) -> BaseException:
    """What a handle call raises when the replica raised `e`: Ray's RayTaskError that is also an instance of e's
    class."""
    from ray.exceptions import RayTaskError

    if not isinstance(e, ServeError):
        return e
    return RayTaskError("SAEModel", "traceback", e).as_instanceof_cause()


class _Gen:
    def __init__(self, agen, owner):
        self._agen, self._owner = agen, owner

    async def __anext__(self):
        try:
            return await self._agen.__anext__()
        except Exception as e:
            raise as_ray_raises(e) from None

    def cancel(self):
        self._owner.cancelled += 1


class _Method:
    def __init__(self, fn, owner, stream):
        self._fn, self._owner, self._stream = fn, owner, stream

    def remote(self, *args):
        return _Gen(self._fn(*args), self._owner) if self._stream else self._call(*args)

    async def _call(self, *args):
        try:
            return await self._fn(*args)
        except Exception as e:
            raise as_ray_raises(e) from None


class FakeHandle:
    """The slice of DeploymentHandle that ReplicaClient uses."""

    def __init__(self, model: ScriptedModel, stream: bool = False):
        self._model, self._stream = model, stream

    def options(self, stream: bool = False):
        return FakeHandle(self._model, stream)

    def __getattr__(self, name):
        return _Method(getattr(self._model, name), self._model, self._stream)


def make_client(keys: KeyStore = KeyStore(), **config) -> tuple[TestClient, ScriptedModel, IngressContext]:
    model = ScriptedModel()
    ctx = IngressContext(
        config=ServiceConfig.model_validate(config),
        replica=ReplicaClient(FakeHandle(model)),
        keys=keys,
        metrics=ServiceMetrics(),
        created=0,
    )
    return TestClient(create_api(ctx), raise_server_exceptions=False), model, ctx


def sse_events(text: str) -> list:
    assert text.endswith("\n\n")
    return [e.removeprefix("data: ") for e in text.strip().split("\n\n")]


def test_sse_stream_with_usage_and_done():
    client, model, _ = make_client()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 1,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 6,
        "total_tokens": 10,
    }
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and all(m["delta"]["role"] is None for m in mine[1:])
        assert "".join(m["delta"]["content"] for m in mine) == " one two three"
        assert mine[-1]["finish_reason"] == "length"
        assert mine[0]["logprobs"]["content"][0]["top_logprobs"] == [
            {"token": "a", "logprob": -0.5, "bytes": [97]},
            {"token": "b", "logprob": -1.5, "bytes": [98]},
        ]
    assert model.calls[0].top_logprobs_count() == 1 and model.calls[0].stream


def test_error_mid_stream_is_an_sse_error_event_and_cancels():
    client, model, _ = make_client()
    model.fail_after_first = True
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "stream": True})
    events = sse_events(r.text)
    assert json.loads(events[0])["choices"][0]["text"] == " one"
    assert json.loads(events[-1])["error"]["type"] == "service_unavailable_error"
    assert "[DONE]" not in events
    assert model.cancelled == 1


def test_refused_before_streaming_is_a_plain_http_error():
    client, model, _ = make_client()
    model.fail = SpecError("steering[0].sae: unknown SAE 'x' (loaded: toy)", "steering[0].sae")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "stream": True})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "steering[0].sae: unknown SAE 'x' (loaded: toy)",
        "type": "invalid_request_error",
        "param": "steering[0].sae",
        "code": None,
    }


def test_overload_and_dead_model_are_fast_503s():
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    client, model, _ = make_client()
    model.fail = BackPressureError(num_queued_requests=64, max_queued_requests=64)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
    model.fail = RayActorError()
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    model.fail = EngineUnavailable()
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    text = client.get("/metrics").text
    assert 'sae_serve:request_errors_total{endpoint="/health",type="service_unavailable_error"} 2.0' in text


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": MODEL, "prompt": "hi", "n": 9}, 400, "n"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo"),
        ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
        (
            {"model": MODEL, "prompt": "hi", "steering": [{"sae": "toy", "feature": -1, "value": 1}]},
            400,
            "steering[0].feature",
        ),
        ({"model": "other", "prompt": "hi"}, 404, "model"),
        ({"prompt": "hi"}, 400, "model"),
    ],
)
def test_completion_limits_and_validation(body, status, param):
    client, model, _ = make_client()
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert status == 404 or param in r.json()["error"]["message"]
    assert not model.calls


def test_chat_validation_messages():
    client, _, _ = make_client()
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": image}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].type"
    r = client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = client.post("/v1/chat/completions", content="{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_keys_scopes_and_bearer_parsing(tmp_path):
    (tmp_path / "user").write_text("# comment\nuser-key\n\n")
    keys = KeyStore.from_config(
        AuthConfig(api_keys_file=tmp_path / "user", api_keys_env="NO_SUCH_ENV_1", admin_keys_env="NO_SUCH_ENV_2")
    )
    assert keys.scope_of("user-key") == "user" and keys.scope_of("user-key ") is None
    assert "user-key" not in repr(keys)  # only digests are kept
    client, _, _ = make_client(keys)
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Basic user-key"}).status_code == 401
    r = client.get("/v1/models", headers={"Authorization": "Bearer user-key"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    r = client.post("/v1/saes", json={"path": "x"}, headers={"Authorization": "Bearer user-key"})
    assert r.status_code == 403
    assert client.get("/health").status_code == 200  # health and metrics need no key


def test_admin_env_keys(monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_KEYS", "adm-1, adm-2")
    keys = KeyStore.from_config(AuthConfig(api_keys_env="NO_SUCH_ENV_1", admin_keys_env="TEST_ADMIN_KEYS"))
    assert keys.scope_of("adm-2") == "admin" and keys.enabled


def test_no_keys_only_loopback():
    cfg = ServiceConfig()
    check_binding(cfg, KeyStore(), "127.0.0.1")
    with pytest.raises(ValueError, match="refuses to listen on '0.0.0.0'"):
        check_binding(cfg, KeyStore(), "0.0.0.0")
    check_binding(cfg, KeyStore(user=(b"x",)), "0.0.0.0")


def test_body_limit_and_unknown_route():
    client, _, _ = make_client()
    r = client.post("/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.delete("/v1/models")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_stream_batching_merges_after_the_first_item():
    from serve.replica.stream_batch import batched

    async def source():
        for i in range(6):
            yield i
            await asyncio.sleep(0.01)

    async def collect(interval):
        return [group async for group in batched(source(), interval)]

    groups = asyncio.run(collect(0.035))
    assert groups[0] == [0] and sum(groups, []) == list(range(6)) and len(groups) < 6
    assert asyncio.run(collect(None)) == [[0], list(range(1, 6))]
    assert asyncio.run(collect(0)) == [[i] for i in range(6)]


def test_canonical_serve_config_and_cli(tmp_path, capsys):
    import yaml

    from serve.launch.cli import DEFAULT_SERVE_CONFIG, main

    doc = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text())
    assert doc["applications"][0]["import_path"] == "serve.launch.app:build_app"
    cfg = ServiceConfig.from_yaml(DEFAULT_SERVE_CONFIG)
    assert cfg.host == doc["http_options"]["host"] and cfg.port == doc["http_options"]["port"]
    assert (cfg.sae_registry / "smollm2-l15-resid-8x" / "sae.json").is_file()  # the shipped demo SAE
    bad = tmp_path / "open.yaml"
    bad.write_text("host: 0.0.0.0\nauth: {api_keys_env: NO_SUCH_ENV_1, admin_keys_env: NO_SUCH_ENV_2}\n")
    assert main(["up", "--config", str(bad)]) == 2  # refused before Ray starts
    assert "refuses to listen on '0.0.0.0'" in capsys.readouterr().err


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class DyingModelHandle:
    """A model deployment whose replica dies under the first call and is back once `up` is set."""

    def __init__(self):
        self.up = asyncio.Event()
        self.calls = 0
        self.saes = _Remote(self._saes)
        self.ping = _Remote(self.up.wait)

    async def _saes(self, version):
        from ray.exceptions import RayActorError

        self.calls += 1
        if self.calls == 1:
            raise RayActorError()
        return ["toy"]


def test_a_model_found_down_is_refused_at_once_until_a_probe_gets_through():
    async def scenario():
        handle = DyingModelHandle()
        client = ReplicaClient(handle)
        for _ in range(2):  # the call the replica died under, then one refused without reaching Ray
            with pytest.raises(ModelUnavailable) as e:
                await client.saes()
            assert (e.value.status, e.value.code, e.value.headers) == (503, "model_unavailable", {"Retry-After": "5"})
        assert handle.calls == 1
        handle.up.set()  # Ray's router lets the probe through once a replica runs
        await asyncio.wait_for(client._recovery, 5)
        assert await client.saes() == ["toy"] and handle.calls == 2

    asyncio.run(scenario())
