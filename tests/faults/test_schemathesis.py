"""A bounded schemathesis run over the live service's /openapi.json: schema-valid and schema-violating requests
to every endpoint must never get a 5xx, every 4xx must be in the OpenAI error shape, and every answer's status code
and content type must be ones the document declares for that operation (a client generated from it must not meet an
undocumented status or media type).

DELETE /v1/saes/{id} is left out (a generated `toy` would unload the shared service's SAE); the adversarial tests
cover it with unknown ids. SAEs a generated POST /v1/saes manages to load are unloaded again at once.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.faults.openai_shape import assert_clean_4xx

# Every operation of the schema except DELETE /v1/saes/{sae_id}; test_every_operation_is_fuzzed keeps this honest.
OPERATIONS = [
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/activations"),
    ("GET", "/v1/saes"),
    ("POST", "/v1/saes"),
    ("GET", "/v1/saes/{sae_id}"),
    ("GET", "/v1/saes/{sae_id}/features"),
    ("GET", "/v1/saes/{sae_id}/features/{feature}"),
    ("GET", "/v1/saes/{sae_id}/plots/{name}"),
    ("GET", "/v1/registry"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]
NOT_FUZZED = {("DELETE", "/v1/saes/{sae_id}")}
ADMIN_OPERATIONS = {("POST", "/v1/saes")}
EXAMPLES_PER_OPERATION = 60
# Generated requests may ask for up to the service's limits; a few tokens are enough to exercise generation.
FEW_TOKENS = 4
FEW_CHOICES = 2
# What schemathesis itself checks of each answer, besides the asserts below.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of one operation's fuzzing: reproducible, no example database, no deadline."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def api_schema(service):
    return schemathesis.openapi.from_url(f"{service.base_url}/openapi.json")


def _small_generation(body) -> None:
    """Shrink in-limit token counts and choices in place; out-of-range values stay (they must be refused)."""
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if type(value) is int and FEW_TOKENS < value <= 10_000:
            body[field] = FEW_TOKENS
    if type(body.get("n")) is int and FEW_CHOICES < body["n"] <= 8:
        body["n"] = FEW_CHOICES
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_completion_tokens"] = FEW_TOKENS  # chat's default is "as many as the context allows"


def _aim_at_the_service(case, model: str) -> None:
    """Name the served model and the loaded SAE where the generated request names one, so that requests get past
    the 404s of unknown names into generation, steering and capture."""
    if "sae_id" in (case.path_parameters or {}):
        case.path_parameters["sae_id"] = "toy"
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body:
        body["model"] = model
    if isinstance(body.get("saes"), list):
        body["saes"] = ["toy"] * len(body["saes"])
    if isinstance(body.get("features"), dict):
        values = list(body["features"].values())
        body["features"] = {"toy": values[-1]} if values else {}
    for entry in body.get("steering") or []:
        if isinstance(entry, dict) and "sae" in entry:
            entry["sae"] = "toy"


def _restore_sae_set(service, response) -> None:
    if response.status_code != 200:
        return
    loaded = response.json()["id"]
    if loaded != "toy":
        with service.http(service.admin_key) as admin:
            assert admin.delete(f"/v1/saes/{loaded}").status_code == 200


def test_every_operation_is_fuzzed(api_schema):
    live = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert live == set(OPERATIONS) | NOT_FUZZED


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_get_no_5xx_and_openai_shaped_4xx(service, api_schema, method, path):
    operation = api_schema[path][method]
    key = service.admin_key if (method, path) in ADMIN_OPERATIONS else service.user_key
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    seen: dict[int, int] = {}

    @fuzz_settings(EXAMPLES_PER_OPERATION)
    @given(case=cases, aimed=st.booleans())
    def check(case, aimed):
        if aimed:
            _aim_at_the_service(case, service.model)
        _small_generation(case.body)
        response = case.call(base_url=service.base_url, session=session, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]}"
        if response.status_code >= 400:
            assert_clean_4xx(response)
        if (method, path) in ADMIN_OPERATIONS:
            _restore_sae_set(service, response)
        case.validate_response(response, checks=CHECKS)

    check()
    assert seen, "no request was sent"


def test_the_service_is_as_the_fuzzing_found_it(service):
    with service.http() as http:
        assert [s["id"] for s in http.get("/v1/saes").json()["data"]] == ["toy"]
        r = http.post(
            "/v1/chat/completions",
            json={"model": service.model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert r.status_code == 200, r.text
