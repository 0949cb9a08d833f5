"""The service's endpoints as the SDK sees them (method, path, request and response models), and one prepared call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from . import request_models as rq
from . import response_models as rs


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    """Path template, e.g. /v1/saes/{sae_id}; the same template the service's OpenAPI lists."""
    response: type[BaseModel]
    request: type[BaseModel] | None = None
    chunk: type[BaseModel] | None = None
    """Model of each server-sent event when the call streams."""

    @property
    def needs_model(self) -> bool:
        """Whether the body must name the served model (the client looks it up when the caller did not)."""
        return (
            self.request is not None
            and "model" in self.request.model_fields
            and self.request.model_fields["model"].is_required()
        )


ROUTES: dict[str, Route] = {
    "models": Route("GET", "/v1/models", rs.ModelList),
    "health": Route("GET", "/health", rs.HealthResponse),
    "chat": Route("POST", "/v1/chat/completions", rs.ChatCompletion, rq.ChatRequest, rs.ChatCompletionChunk),
    "complete": Route("POST", "/v1/completions", rs.Completion, rq.CompletionRequest, rs.Completion),
    "activations": Route("POST", "/v1/activations", rs.ActivationsResponse, rq.ActivationsRequest),
    "saes": Route("GET", "/v1/saes", rs.SAEList),
    "sae": Route("GET", "/v1/saes/{sae_id}", rs.SAECard),
    "feature": Route("GET", "/v1/saes/{sae_id}/features/{feature}", rs.FeatureCard),
    "load_sae": Route("POST", "/v1/saes", rs.SAEInfo, rq.SAELoadRequest),
    "unload_sae": Route("DELETE", "/v1/saes/{sae_id}", rs.SAEDeleted),
}
"""Every endpoint the SDK calls; tests/clients/test_contract.py checks each against /openapi.json."""


def without_none(**fields: Any) -> dict[str, Any]:
    """Keyword arguments the caller set: None means 'the server's default', so it is not sent."""
    return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class Call:
    """One request to make: the route, its path parameters, and the body fields (validated when built)."""

    route: Route
    path_params: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    query: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        name: str,
        *,
        path: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        query: dict[str, Any] | None = None,
    ) -> Call:
        call = cls(ROUTES[name], path or {}, body, query)
        call.json(None)  # a bad body fails here, before the model lookup or any request
        return call

    @property
    def streams(self) -> bool:
        return bool(self.body and self.body.get("stream"))

    def path(self) -> str:
        return self.route.path.format(**{k: quote(str(v), safe="") for k, v in self.path_params.items()})

    def json(self, model: str | None) -> dict[str, Any] | None:
        """The validated body; `model` fills in the served model name when the route needs one and none was given."""
        if self.route.request is None:
            return None
        fields = dict(self.body or {})
        if self.route.needs_model:
            fields.setdefault("model", model or "")
        return self.route.request(**fields).model_dump(mode="json", exclude_unset=True)

    def parse(self, data: Any) -> BaseModel:
        return self.route.response.model_validate(data)

    def parse_chunk(self, data: Any) -> BaseModel:
        return self.route.chunk.model_validate(data)
