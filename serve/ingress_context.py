"""What every route of one ingress replica shares."""

from __future__ import annotations

from dataclasses import dataclass

from .auth import KeyStore
from .config import ServiceConfig
from .errors import APIError
from .metrics import ServiceMetrics
from .model_client import ModelClient


@dataclass
class IngressContext:
    config: ServiceConfig
    model: ModelClient
    keys: KeyStore
    metrics: ServiceMetrics
    created: int  # unix time this replica started (the `created` of /v1/models)

    def check_model(self, name: str | None) -> None:
        """OpenAI answers an unknown model with 404 model_not_found."""
        if name is not None and name != self.config.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def check_at_most(self, value: int | None, limit: int, param: str) -> None:
        if value is not None and value > limit:
            raise APIError(400, f"{param}: {value} is above this server's limit of {limit}", param)
