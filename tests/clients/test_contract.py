"""The SDK's models against the live service's /openapi.json: every route the SDK calls exists with its method;
every request field the SDK sends is a field of the endpoint's body with a type the server accepts, and the SDK
requires exactly the fields the server requires; every response field the SDK reads is in the endpoint's response
schema with the same type, and none the server always sends is missing. A field renamed on either side fails here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from clients.calls import ROUTES, Route
from clients.response_models import ActivationToken, ChatChunkChoice, ChatDelta

# JSON-schema keys that document or constrain values but do not change what a field is.
_IGNORED = {
    "title",
    "description",
    "default",
    "examples",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
}


class Schemas:
    """Resolves $refs of one document (the service's components or a pydantic model's $defs)."""

    def __init__(self, defs: dict[str, Any]):
        self.defs = defs

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self.defs[schema["$ref"].rsplit("/", 1)[-1]]
        return schema


def shape(schemas: Schemas, schema: dict[str, Any]) -> Any:
    """A hashable normal form of what a schema accepts: ('union', ...), ('object', ...), ('array', item), ..."""
    schema = schemas.resolve(schema)
    if "anyOf" in schema or "oneOf" in schema:
        members = set()
        for sub in schema.get("anyOf", schema.get("oneOf")):
            s = shape(schemas, sub)
            members |= s[1] if s[0] == "union" else {s}
        return ("union", frozenset(members)) if len(members) > 1 else next(iter(members))
    if "const" in schema or "enum" in schema:
        return ("enum", frozenset([schema["const"]] if "const" in schema else schema["enum"]))
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        required = set(schema.get("required", ()))
        return (
            "object",
            frozenset((name, shape(schemas, sub), name in required) for name, sub in schema["properties"].items()),
        )
    if kind == "object":
        extra = schema.get("additionalProperties", True)
        return ("map", shape(schemas, extra) if isinstance(extra, dict) else ("any",))
    if kind == "array":
        if "prefixItems" in schema:
            return ("tuple", tuple(shape(schemas, s) for s in schema["prefixItems"]))
        return ("array", shape(schemas, schema.get("items", {})))
    unknown = set(schema) - _IGNORED - {"type", "additionalProperties"}
    assert not unknown, f"schema keys this test does not understand: {unknown}"
    return (kind,) if kind else ("any",)


def _members(s: Any) -> frozenset:
    return s[1] if s[0] == "union" else frozenset({s})


def accepts(wide: Any, narrow: Any) -> bool:
    """Whether every value of shape `narrow` is valid for shape `wide` (unions: each member of `narrow` matches)."""
    if wide == narrow or wide == ("any",):
        return True
    if narrow[0] == "union" or wide[0] == "union":
        return all(any(accepts(w, n) for w in _members(wide)) for n in _members(narrow))
    if wide == ("number",) and narrow == ("integer",):
        return True
    if wide[0] == narrow[0] == "enum":
        return narrow[1] <= wide[1]
    if wide[0] == narrow[0] and wide[0] in ("array", "map"):
        return accepts(wide[1], narrow[1])
    return False


def fields(schemas: Schemas, schema: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
    schema = schemas.resolve(schema)
    required = set(schema.get("required", ()))
    return {name: (shape(schemas, sub), name in required) for name, sub in schema["properties"].items()}


@pytest.fixture(scope="module")
def openapi(service) -> dict[str, Any]:
    with service.http(key=None) as http:
        r = http.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def _operation(openapi: dict[str, Any], route: Route) -> dict[str, Any]:
    ops = openapi["paths"].get(route.path)
    assert ops is not None, f"the service has no {route.path}"
    assert route.method.lower() in ops, f"the service has no {route.method} {route.path}"
    return ops[route.method.lower()]


def _json_schema(container: dict[str, Any]) -> dict[str, Any]:
    return container["content"]["application/json"]["schema"]


def _sdk(model) -> tuple[Schemas, dict[str, Any]]:
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    return Schemas(schema.get("$defs", {})), schema


ROUTE_NAMES = sorted(ROUTES)


@pytest.mark.parametrize("name", ROUTE_NAMES)
def test_request_body_matches(openapi, name):
    route = ROUTES[name]
    op = _operation(openapi, route)
    if route.request is None:
        assert "requestBody" not in op, f"{route.path} takes a body the SDK never sends"
        return
    server = fields(Schemas(openapi["components"]["schemas"]), _json_schema(op["requestBody"]))
    sdk = fields(*_sdk(route.request))
    assert not set(sdk) - set(server), f"SDK fields the server does not know: {set(sdk) - set(server)}"
    missing = {f for f, (_, req) in server.items() if req} - set(sdk)
    assert not missing, f"fields the server requires that the SDK cannot send: {missing}"
    for f, (sdk_shape, sdk_required) in sdk.items():
        server_shape, server_required = server[f]
        assert accepts(server_shape, sdk_shape), f"{name}.{f}: the server does not accept the SDK's type"
        assert sdk_required == server_required, f"{name}.{f}: required on one side only"


@pytest.mark.parametrize("name", ROUTE_NAMES)
def test_response_body_matches(openapi, name):
    route = ROUTES[name]
    op = _operation(openapi, route)
    server = fields(Schemas(openapi["components"]["schemas"]), _json_schema(op["responses"]["200"]))
    sdk = fields(*_sdk(route.response))
    assert not set(sdk) - set(server), f"SDK fields the server never sends: {set(sdk) - set(server)}"
    missing = {f for f, (_, req) in server.items() if req} - set(sdk)
    assert not missing, f"fields the server always sends that the SDK drops: {missing}"
    for f, (sdk_shape, _) in sdk.items():
        assert accepts(sdk_shape, server[f][0]), f"{name}.{f}: the SDK cannot parse the server's type"


def test_stream_chunks_carry_the_sdk_chunk_fields(service):
    """Chunks travel as SSE, outside OpenAPI: read real ones and compare their keys with the SDK's chunk models.
    `steering_report` is sent on the last chunk of a steered stream only, a choice's `features` with live features
    only."""
    chunk = ROUTES["chat"].chunk
    for steering, live in (
        ([], None),
        ([{"sae": "toy", "feature": 1, "value": 1.0}], None),
        ([], {"saes": ["toy"], "top_k": 2}),
    ):
        body = {
            "model": service.model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
            "steering": steering,
            **({"sae_features": live} if live else {}),
        }
        with service.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [json.loads(line[len("data: ") :]) for line in r.iter_lines() if line.startswith("data: {")]
        assert len(events) >= 2
        reported = [i for i, e in enumerate(events) if "steering_report" in e]
        # The usage chunk comes after the last content chunk, which carries the report.
        assert reported == ([len(events) - 2] if steering else [])
        for event in events:
            assert set(event) | {"steering_report"} == set(chunk.model_fields)
            for choice in event["choices"]:
                assert ("features" in choice) == bool(live)
                assert set(choice) | {"features"} == set(ChatChunkChoice.model_fields)
                assert set(choice["delta"]) == set(ChatDelta.model_fields)
                for token in choice.get("features", []):
                    ActivationToken.model_validate(token)


def test_the_shape_check_catches_a_renamed_field(openapi):
    """The comparison itself can fail: the server's SteeringEntry with `feature` renamed is not what the SDK sends."""
    components = openapi["components"]["schemas"]
    renamed = dict(components["SteeringEntry"])
    renamed["properties"] = {("index" if k == "feature" else k): v for k, v in renamed["properties"].items()}
    renamed["required"] = ["index" if k == "feature" else k for k in renamed.get("required", [])]
    schemas = Schemas({**components, "SteeringEntry": renamed})
    server = fields(schemas, _json_schema(_operation(openapi, ROUTES["chat"])["requestBody"]))
    sdk = fields(*_sdk(ROUTES["chat"].request))
    original = fields(Schemas(components), _json_schema(_operation(openapi, ROUTES["chat"])["requestBody"]))
    assert accepts(original["steering"][0], sdk["steering"][0])
    assert not accepts(server["steering"][0], sdk["steering"][0])
