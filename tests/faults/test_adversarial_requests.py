"""Hand-written hostile requests against the live service: each is a 4xx in the OpenAI error shape (never a 5xx,
never a crash), and the service still answers a normal chat afterwards."""

from __future__ import annotations

import json

import pytest

from tests.faults.openai_shape import assert_clean_4xx

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 4, **fields}


def steer(**entry) -> dict:
    return chat(steering=[{"sae": "toy", "feature": 1, "value": 1.0, **entry}])


def raw(text: str | bytes) -> dict:
    return {"content": text, "headers": JSON}


def nested(depth: int) -> str:
    return '{"model": "%s", "prompt": %s"hi"%s}' % (MODEL, "[" * depth, "]" * depth)


# (id, method, path, httpx keyword arguments, expected status or None for any 4xx, expected `param` or None)
CASES = [
    # malformed bodies
    ("truncated-json", "POST", "/v1/chat/completions", raw('{"model": "x", "messages": ['), 400, None),
    ("empty-body", "POST", "/v1/chat/completions", raw(""), 400, None),
    ("json-array-body", "POST", "/v1/chat/completions", raw("[1, 2, 3]"), 400, None),
    ("json-null-body", "POST", "/v1/activations", raw("null"), 400, None),
    (
        "not-json-content-type",
        "POST",
        "/v1/completions",
        {"content": json.dumps({"model": MODEL, "prompt": "hi"}), "headers": {"Content-Type": "text/plain"}},
        400,
        None,
    ),
    (
        "invalid-utf8",
        "POST",
        "/v1/completions",
        raw(b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe\xc3"}'),
        400,
        None,
    ),
    ("lone-surrogate", "POST", "/v1/completions", raw('{"model": "%s", "prompt": "\\ud800"}' % MODEL), None, None),
    ("deeply-nested-json", "POST", "/v1/completions", raw(nested(200_000)), 400, None),
    ("nested-just-below-recursion", "POST", "/v1/completions", raw(nested(900)), 400, None),
    # wrong types
    ("messages-as-string", "POST", "/v1/chat/completions", {"json": chat(messages="hello")}, 400, "messages"),
    ("max-tokens-as-string", "POST", "/v1/chat/completions", {"json": chat(max_tokens="ten")}, 400, "max_tokens"),
    ("steering-as-object", "POST", "/v1/chat/completions", {"json": chat(steering={"sae": "toy"})}, 400, "steering"),
    ("feature-as-float", "POST", "/v1/chat/completions", {"json": steer(feature=1.5)}, 400, "steering[0].feature"),
    ("value-as-string", "POST", "/v1/chat/completions", {"json": steer(value="lots")}, 400, "steering[0].value"),
    (
        "content-part-not-text",
        "POST",
        "/v1/chat/completions",
        {"json": chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])},
        400,
        None,
    ),
    (
        "unknown-role",
        "POST",
        "/v1/chat/completions",
        {"json": chat(messages=[{"role": "tool", "content": "x"}])},
        400,
        None,
    ),
    # non-finite numbers in steering
    (
        "steering-nan",
        "POST",
        "/v1/chat/completions",
        raw(
            '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], '
            '"steering": [{"sae": "toy", "feature": 1, "value": NaN}]}' % MODEL
        ),
        400,
        "steering[0].value",
    ),
    (
        "steering-infinity",
        "POST",
        "/v1/completions",
        raw('{"model": "%s", "prompt": "hi", "steering": [{"sae": "toy", "feature": 1, "value": -Infinity}]}' % MODEL),
        400,
        "steering[0].value",
    ),
    (
        "steering-overflow-to-inf",
        "POST",
        "/v1/completions",
        raw('{"model": "%s", "prompt": "hi", "steering": [{"sae": "toy", "feature": 1, "value": 1e999}]}' % MODEL),
        400,
        "steering[0].value",
    ),
    (
        "activations-steering-nan",
        "POST",
        "/v1/activations",
        raw('{"input": "hi", "saes": ["toy"], "steering": [{"sae": "toy", "feature": 1, "value": NaN}]}'),
        400,
        "steering[0].value",
    ),
    # huge and negative indices
    (
        "feature-beyond-d-sae",
        "POST",
        "/v1/chat/completions",
        {"json": steer(feature=10**6)},
        400,
        "steering[0].feature",
    ),
    (
        "feature-beyond-int64",
        "POST",
        "/v1/chat/completions",
        {"json": steer(feature=10**30)},
        400,
        "steering[0].feature",
    ),
    ("feature-negative", "POST", "/v1/chat/completions", {"json": steer(feature=-1)}, 400, "steering[0].feature"),
    (
        "activations-feature-beyond-d-sae",
        "POST",
        "/v1/activations",
        {"json": {"input": "hi", "saes": ["toy"], "features": {"toy": [10**12]}}},
        400,
        None,
    ),
    (
        "activations-feature-of-unlisted-sae",
        "POST",
        "/v1/activations",
        {"json": {"input": "hi", "saes": ["toy"], "features": {"nope": [1]}}},
        None,
        None,
    ),
    ("feature-card-beyond-d-sae", "GET", f"/v1/saes/toy/features/{10**30}", {}, 404, None),
    ("feature-card-negative", "GET", "/v1/saes/toy/features/-5", {}, 404, None),
    ("feature-card-not-a-number", "GET", "/v1/saes/toy/features/abc", {}, 400, "feature"),
    ("feature-card-top-n-huge", "GET", "/v1/saes/toy/features/1?top_n=1000000000", {}, 400, "top_n"),
    (
        "token-ids-outside-vocabulary",
        "POST",
        "/v1/completions",
        {"json": {"model": MODEL, "prompt": [1, 10**9], "max_tokens": 2}},
        400,
        "prompt",
    ),
    (
        "token-ids-negative",
        "POST",
        "/v1/completions",
        {"json": {"model": MODEL, "prompt": [-3], "max_tokens": 2}},
        400,
        "prompt",
    ),
    ("seed-beyond-int64", "POST", "/v1/chat/completions", {"json": chat(seed=2**70)}, 400, "seed"),
    # unknown fields
    ("unknown-field-in-steering", "POST", "/v1/chat/completions", {"json": steer(scale=2)}, 400, "steering[0].scale"),
    (
        "unknown-field-in-message",
        "POST",
        "/v1/chat/completions",
        {"json": chat(messages=[{"role": "user", "content": "Hi", "tool_call_id": "x"}])},
        400,
        None,
    ),
    (
        "unknown-field-in-activations",
        "POST",
        "/v1/activations",
        {"json": {"input": "hi", "saes": ["toy"], "layers": [3]}},
        400,
        "layers",
    ),
    ("unknown-field-in-sae-load", "POST", "/v1/saes", {"json": {"path": "extra", "force": True}}, 400, "force"),
    # limits
    (
        "very-long-prompt",
        "POST",
        "/v1/completions",
        {"json": {"model": MODEL, "prompt": "the sea " * 60_000, "max_tokens": 2}},
        400,
        "prompt",
    ),
    (
        "very-long-chat",
        "POST",
        "/v1/chat/completions",
        {"json": chat(messages=[{"role": "user", "content": "word " * 100_000}])},
        400,
        "messages",
    ),
    ("n-beyond-limit", "POST", "/v1/chat/completions", {"json": chat(n=10**9)}, 400, "n"),
    ("n-zero", "POST", "/v1/chat/completions", {"json": chat(n=0)}, 400, "n"),
    (
        "max-tokens-beyond-limit",
        "POST",
        "/v1/completions",
        {"json": {"model": MODEL, "prompt": "hi", "max_tokens": 10**12}},
        400,
        "max_tokens",
    ),
    ("max-tokens-zero", "POST", "/v1/chat/completions", {"json": chat(max_tokens=0)}, 400, "max_tokens"),
    (
        "top-logprobs-beyond-limit",
        "POST",
        "/v1/chat/completions",
        {"json": chat(logprobs=True, top_logprobs=10**6)},
        400,
        "top_logprobs",
    ),
    (
        "activations-top-k-beyond-limit",
        "POST",
        "/v1/activations",
        {"json": {"input": "hi", "saes": ["toy"], "top_k": 10**6}},
        400,
        "top_k",
    ),
    (
        "too-many-steering-entries",
        "POST",
        "/v1/chat/completions",
        {"json": chat(steering=[{"sae": "toy", "feature": i % 256, "value": 1.0} for i in range(5000)])},
        400,
        None,
    ),
    ("oversized-body", "POST", "/v1/chat/completions", raw("x" * (2 << 20)), 413, None),
    (
        "oversized-chunked-body",
        "POST",
        "/v1/chat/completions",
        {"content": iter([b"{" + b" " * (1 << 16)] * 40), "headers": JSON},
        413,
        None,
    ),
    # unknown SAEs
    ("steering-unknown-sae", "POST", "/v1/chat/completions", {"json": steer(sae="nope")}, 400, "steering[0].sae"),
    (
        "steering-registry-sae-not-loaded",
        "POST",
        "/v1/chat/completions",
        {"json": steer(sae="extra")},
        400,
        "steering[0].sae",
    ),
    ("activations-unknown-sae", "POST", "/v1/activations", {"json": {"input": "hi", "saes": ["nope"]}}, 400, None),
    ("card-of-unknown-sae", "GET", "/v1/saes/nope", {}, 404, None),
    ("feature-of-unknown-sae", "GET", "/v1/saes/nope/features/1", {}, 404, None),
    ("unload-unknown-sae", "DELETE", "/v1/saes/nope", {}, 404, None),
    # path traversal and odd paths in POST /v1/saes
    ("load-parent-dir", "POST", "/v1/saes", {"json": {"path": "../"}}, 400, "path"),
    ("load-dotdot-escape", "POST", "/v1/saes", {"json": {"path": "toy/../../../../etc"}}, 400, "path"),
    ("load-absolute-outside", "POST", "/v1/saes", {"json": {"path": "/etc"}}, 400, "path"),
    ("load-home", "POST", "/v1/saes", {"json": {"path": "~/"}}, 400, "path"),
    ("load-null-byte", "POST", "/v1/saes", {"json": {"path": "toy\x00/../../etc"}}, 400, "path"),
    ("load-registry-root", "POST", "/v1/saes", {"json": {"path": "."}}, 400, "path"),
    ("load-missing-folder", "POST", "/v1/saes", {"json": {"path": "does-not-exist"}}, 400, "path"),
    ("load-with-traversal-id", "POST", "/v1/saes", {"json": {"path": "extra", "id": "../../x"}}, 400, "id"),
    ("card-encoded-traversal", "GET", "/v1/saes/..%2F..%2Fetc%2Fpasswd", {}, 404, None),
]
ADMIN_PATHS = ("/v1/saes",)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_request_is_a_clean_4xx(service, method, path, kwargs, status, param):
    admin = method in ("POST", "DELETE") and path.startswith(ADMIN_PATHS)
    with service.http(service.admin_key if admin else service.user_key) as http:
        r = http.request(method, path, **kwargs)
    err = assert_clean_4xx(r, status)
    if param is not None:
        assert err["param"] == param, err


def test_service_still_chats_and_serves_toy_after_hostile_requests(service):
    with service.http() as http:
        r = http.post("/v1/chat/completions", json=chat(max_tokens=8, temperature=0))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert [s["id"] for s in http.get("/v1/saes").json()["data"]] == ["toy"]
        assert http.get("/health").status_code == 200
