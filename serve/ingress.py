"""The ingress deployment: HTTP in front of the model deployment (auth, validation, OpenAI shapes, SSE, metrics).

A plain class; `serve.app.build_app` wraps it with `serve.ingress()` and `serve.deployment`.
"""

from __future__ import annotations

import time

from .auth import KeyStore
from .config import ServiceConfig
from .ingress_context import IngressContext
from .metrics import ServiceMetrics
from .model_client import ModelClient


class Ingress:
    def __init__(self, config: dict, model, keys: KeyStore):
        self._ctx = IngressContext(
            config=ServiceConfig.model_validate(config),
            model=ModelClient(model),
            keys=keys,
            metrics=ServiceMetrics(),
            created=int(time.time()),
        )

    def __serve_build_asgi_app__(self):
        """Called by Ray Serve on the replica after __init__ (the app holds this replica's context)."""
        from .api import create_api

        return create_api(self._ctx)
