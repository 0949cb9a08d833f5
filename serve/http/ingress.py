"""The ingress deployment: HTTP in front of the model deployment (auth, validation, OpenAI shapes, SSE, metrics).

A plain class; `serve.launch.app.build_app` wraps it with `serve.ingress()` and `serve.deployment`.
"""

from __future__ import annotations

import time

from serve.config import ServiceConfig
from serve.http.auth import KeyStore
from serve.http.context import IngressContext
from serve.http.metrics import ServiceMetrics
from serve.http.replica_client import ReplicaClient


class Ingress:
    def __init__(self, config: dict, model, keys: KeyStore):
        self._ctx = IngressContext(
            config=ServiceConfig.model_validate(config),
            replica=ReplicaClient(model),
            keys=keys,
            metrics=ServiceMetrics(),
            created=int(time.time()),
        )

    def __serve_build_asgi_app__(self):
        """Called by Ray Serve on the replica after __init__ (the app holds this replica's context)."""
        from serve.http.api import create_api

        return create_api(self._ctx)
