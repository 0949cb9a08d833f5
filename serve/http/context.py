"""What every route of one ingress replica shares."""

from __future__ import annotations

from dataclasses import dataclass

from serve.config import ServiceConfig
from serve.errors import InvalidRequest, NotFound
from serve.http.auth import KeyStore
from serve.http.metrics import ServiceMetrics
from serve.http.replica_client import ReplicaClient


@dataclass
class IngressContext:
    config: ServiceConfig
    replica: ReplicaClient
    keys: KeyStore
    metrics: ServiceMetrics
    created: int  # unix time this replica started (the `created` of /v1/models)

    def check_model(self, name: str | None) -> None:
        """OpenAI answers an unknown model with 404 model_not_found."""
        if name is not None and name != self.config.served_model_name:
            raise NotFound(f"The model `{name}` does not exist.", "model", "model_not_found")

    def check_at_most(self, value: int | None, limit: int, param: str) -> None:
        if value is not None and value > limit:
            raise InvalidRequest(f"{param}: {value} is above this server's limit of {limit}", param)
