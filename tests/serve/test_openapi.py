"""The ingress's OpenAPI document tells the truth, checked in-process (no Ray, no vLLM) with a scripted model.

Every operation documents the error statuses its code can send, in the OpenAI error shape (`ErrorResponse`), and
never FastAPI's 422; /metrics is Prometheus text. A short schemathesis run against the ASGI app then checks that what
the app answers (statuses, media types, bodies, headers) is what the document declares. The bounded run against the
live service is tests/faults/test_schemathesis.py.
"""

from __future__ import annotations

import hashlib

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serve.config import ServiceConfig
from serve.errors import EngineUnavailable, InvalidRequest, NotFound
from serve.http.api import create_api
from serve.http.auth import KeyStore
from serve.http.context import IngressContext
from serve.http.metrics import ServiceMetrics
from serve.http.replica_client import ReplicaClient
from serve.http.routes.deps import require_admin, require_user
from serve.protocol import (
    ActivationsResponse,
    FeatureCard,
    FeatureList,
    RegistryStatus,
    SAECard,
    Usage,
)
from tests.faults.openai_shape import assert_clean_4xx
from tests.faults.test_schemathesis import _aim_at_the_service, fuzz_settings
from tests.serve.test_service_api import MODEL, FakeHandle, ScriptedModel, make_client

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

# The contract: what each operation can answer besides its 200 (500, the crash handler, goes with every one).
# 400 validation or limits, 401 no/unknown key, 403 not admin, 404 unknown model/SAE/feature/plot,
# 413 body over the limit, 503 model or engine down / overloaded.
EXPECTED_ERRORS = {
    ("GET", "/v1/models"): {401},
    ("POST", "/v1/completions"): {400, 401, 404, 413, 503},
    ("POST", "/v1/chat/completions"): {400, 401, 404, 413, 503},
    ("POST", "/v1/activations"): {400, 401, 404, 413, 503},
    ("GET", "/v1/saes"): {401, 503},
    ("POST", "/v1/saes"): {400, 401, 403, 413, 503},
    ("GET", "/v1/saes/{sae_id}"): {401, 404, 503},
    ("DELETE", "/v1/saes/{sae_id}"): {401, 403, 404, 503},
    ("GET", "/v1/saes/{sae_id}/features"): {400, 401, 404, 503},
    ("GET", "/v1/saes/{sae_id}/features/{feature}"): {400, 401, 404, 503},
    ("GET", "/v1/saes/{sae_id}/plots/{name}"): {401, 404, 503},
    ("GET", "/v1/registry"): {401, 503},
    ("GET", "/health"): {503},
    ("GET", "/metrics"): set(),
}
STREAMING = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions")}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def document() -> dict:
    client, _, _ = make_client()
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method, op in item.items():
            yield (method.upper(), path), op


def test_every_operation_documents_exactly_its_error_statuses(document):
    ops = dict(_operations(document))
    assert set(ops) == set(EXPECTED_ERRORS)
    for key, op in ops.items():
        documented = {int(s) for s in op["responses"] if s != "200"}
        assert "200" in op["responses"], key
        assert documented == EXPECTED_ERRORS[key] | {500}, key
        for status in documented:
            response = op["responses"][str(status)]
            assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (key, status)
            assert response["description"], (key, status)
        if 503 in documented:
            assert "Retry-After" in op["responses"]["503"]["headers"], key
        if 401 in documented:
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"], key


def test_no_422_and_no_unsent_validation_schemas(document):
    for key, op in _operations(document):
        assert "422" not in op["responses"], key
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert {"ErrorResponse", "ErrorDetail"} <= set(schemas)
    assert schemas["ErrorResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorDetail",
        "description": "The error.",
    }
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}


def test_statuses_follow_the_routes_dependencies_and_bodies(document):
    """401 wherever a key is checked, 403 wherever an admin key is, 400 and 413 wherever a body is read."""
    app = make_client()[0].app
    responses = {(m, p): {int(s) for s in op["responses"]} for (m, p), op in _operations(document)}

    def calls(dependant) -> set:
        return {dependant.call} | set().union(*(calls(d) for d in dependant.dependencies))

    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods:
            documented, deps = responses[(method, route.path)], calls(route.dependant)
            assert (401 in documented) == (require_user in deps), route.path
            assert (403 in documented) == (require_admin in deps), route.path
            if route.body_field is not None:
                assert {400, 413} <= documented, route.path
            elif 413 in documented:
                pytest.fail(f"{method} {route.path} reads no body but documents 413")


def test_metrics_is_prometheus_text_and_streams_are_json_or_sse(document):
    ok = document["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/plain"] and ok["content"]["text/plain"]["schema"]["type"] == "string"
    client, _, _ = make_client()
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    health = document["paths"]["/health"]["get"]["responses"]
    assert health["200"]["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/HealthResponse"}}}
    for method, path in STREAMING:
        ok = document["paths"][path][method.lower()]["responses"]["200"]
        assert set(ok["content"]) == {"application/json", "text/event-stream"}, path
        assert ok["content"]["application/json"]["schema"]["$ref"].startswith("#/components/schemas/"), path
    plot = document["paths"]["/v1/saes/{sae_id}/plots/{name}"]["get"]["responses"]["200"]
    assert list(plot["content"]) == ["image/png"]


# --- schemathesis against the app in-process ---------------------------------------------------------------------

USER_KEY, ADMIN_KEY = "user-key", "admin-key"
EXAMPLES_PER_OPERATION = 12
# A small body limit, so that generated bodies meet the 413 as well.
BODY_LIMIT = 1024
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


class ServingModel(ScriptedModel):
    """ScriptedModel answering every replica call as SAEModel does: SAE `toy` (16 features, plot `loss.png`) is
    loaded and other ids are 404s; loads are refused (no registry); `fail` makes every call raise."""

    D_SAE = 16

    def _check(self, sae_id: str | None = None) -> None:
        if self.fail is not None:
            raise self.fail
        if sae_id is not None and sae_id != "toy":
            raise NotFound(f"SAE {sae_id!r} is not loaded", "id", "sae_not_found")

    async def saes(self, version):
        self._check()
        return await super().saes(version)

    async def sae_card(self, sae_id, version):
        self._check(sae_id)
        info = (await super().saes(version))[0]
        return SAECard(**info.model_dump(), model="", k=None, metadata={}, card=None, has_feature_stats=False)

    async def feature(self, sae_id, index, top_n, version):
        self._check(sae_id)
        if not 0 <= index < self.D_SAE:
            raise NotFound(f"feature {index} out of range", "feature", "feature_not_found")
        return FeatureCard(sae=sae_id, feature=index, decoder_norm=1.0, top_tokens=[], bottom_tokens=[])

    async def feature_list(self, sae_id, query, limit, offset, version):
        self._check(sae_id)
        return FeatureList(sae=sae_id, total=0, data=[])

    async def sae_plot(self, sae_id, name, version):
        self._check(sae_id)
        if name != "loss.png":
            raise NotFound(f"SAE {sae_id!r} has no plot {name!r}", "name", "plot_not_found")
        return b"\x89PNG\r\n\x1a\n"

    async def load_sae(self, path, sae_id):
        self._check()
        raise InvalidRequest("path: no sae_registry is configured, so no SAE can be loaded at run time", "path")

    async def unload_sae(self, sae_id):
        self._check(sae_id)
        return 1

    async def registry_status(self):
        self._check()
        return RegistryStatus(watching=False, entries=[])

    async def activations(self, req, version):
        self._check()
        return ActivationsResponse(
            model=MODEL,
            saes=[],
            text="hi",
            generated_text="",
            tokens=[],
            usage=Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1),
        )


@pytest.fixture(scope="module")
def served():
    model = ServingModel()
    config = ServiceConfig.model_validate({"limits": {"max_body_bytes": BODY_LIMIT}})
    user, admin = (hashlib.sha256(k.encode()).digest() for k in (USER_KEY, ADMIN_KEY))
    keys = KeyStore(user=(user, admin), admin=(admin,))  # as from_config builds it: admin keys are user keys too
    ctx = IngressContext(
        config=config, replica=ReplicaClient(FakeHandle(model)), keys=keys, metrics=ServiceMetrics(), created=0
    )
    app = create_api(ctx)
    return schemathesis.openapi.from_asgi("/openapi.json", app), model


def test_schemathesis_in_process_finds_the_answers_documented(served):
    schema, model = served
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == set(EXPECTED_ERRORS)
    seen: set[tuple[str, int]] = set()
    for operation in operations:
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )

        @fuzz_settings(EXAMPLES_PER_OPERATION)
        @given(
            case=cases,
            aimed=st.booleans(),
            key=st.sampled_from([ADMIN_KEY, ADMIN_KEY, USER_KEY, None]),
            down=st.sampled_from([False, False, False, True]),
        )
        def check(case, aimed, key, down):
            if aimed:
                _aim_at_the_service(case, MODEL)
            model.fail = EngineUnavailable() if down else None
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = case.call(headers=headers)
            seen.add((case.operation.label, response.status_code))
            if 400 <= response.status_code < 500:
                assert_clean_4xx(response)
            assert response.status_code != 500, response.text
            # With the model down, a 503 is the right answer (and documented); otherwise no 5xx at all.
            checks = [c for c in CHECKS if not (down and c is not_a_server_error)]
            case.validate_response(response, checks=checks, headers=headers)

        check()
    statuses = {status for _, status in seen}
    assert {200, 400, 401, 403, 404, 413, 503} <= statuses, sorted(seen)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1}
EXPLICIT = [
    ("POST", "/v1/completions", {}, {"model": MODEL, "prompt": "hi", "logprobs": 1}, "application/json"),
    ("POST", "/v1/completions", {}, {"model": MODEL, "prompt": "hi", "stream": True}, "text/event-stream"),
    ("POST", "/v1/chat/completions", {}, CHAT, "application/json"),
    (
        "POST",
        "/v1/chat/completions",
        {},
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        "text/event-stream",
    ),
    ("POST", "/v1/activations", {}, {"model": MODEL, "input": "hi", "saes": ["toy"]}, "application/json"),
    ("GET", "/v1/saes/{sae_id}/plots/{name}", {"sae_id": "toy", "name": "loss.png"}, None, "image/png"),
    ("GET", "/v1/saes/{sae_id}/features/{feature}", {"sae_id": "toy", "feature": 3}, None, "application/json"),
    ("DELETE", "/v1/saes/{sae_id}", {"sae_id": "toy"}, None, "application/json"),
]


@pytest.mark.parametrize(
    ("method", "path", "path_parameters", "body", "media_type"),
    EXPLICIT,
    ids=[f"{m} {p} {t}" for m, p, _, _, t in EXPLICIT],
)
def test_schemathesis_in_process_200s_conform(served, method, path, path_parameters, body, media_type):
    """The 200s fuzzing rarely reaches: JSON and SSE generations, activations, a plot, a feature card, an unload."""
    schema, model = served
    model.fail = None
    extra = {} if body is None else {"body": body, "media_type": "application/json"}
    case = schema[path][method].Case(path_parameters=path_parameters, **extra)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = case.call(headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"][0].startswith(media_type)
    case.validate_response(response, checks=CHECKS, headers=headers)
