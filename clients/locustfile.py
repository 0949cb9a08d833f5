"""Locust scenarios against a running sae-serve: plain chat, chat steered on random features of a loaded SAE,
per-token activations, or a weighted mix of them. Configured by env (clients/load_config.py), e.g.

    SAE_SERVE_LOAD_SCENARIO=mixed locust -f clients/locustfile.py --host http://127.0.0.1:8000

or through `sae-serve loadtest`. Each request is checked against the SDK's response model, so a 200 with a wrong
body counts as a failure. Request names in the stats: `chat`, `chat steered`, `activations` (and `setup ...`).
"""

from __future__ import annotations

import random

from locust import HttpUser, constant
from pydantic import BaseModel, ValidationError

from clients.load_config import DEFAULT_PROMPTS, LoadConfig
from clients.request_models import ActivationsRequest, ChatRequest, SteeringEntry
from clients.response_models import ActivationsResponse, ChatCompletion, ModelList, SAEList

CONFIG = LoadConfig.from_env()


def _post(user: SAEServeUser, path: str, name: str, body: BaseModel, response: type[BaseModel]) -> None:
    payload = body.model_dump(mode="json", exclude_unset=True)
    with user.client.post(path, json=payload, name=name, catch_response=True) as r:
        if r.status_code != 200:
            r.failure(f"HTTP {r.status_code}: {r.text[:300]}")
            return
        try:
            response.model_validate_json(r.content)
        except ValidationError as e:
            r.failure(f"unexpected body: {e}")


def _chat(user: SAEServeUser, name: str, steering: list[SteeringEntry]) -> None:
    body = ChatRequest(
        model=user.model,
        messages=[{"role": "user", "content": random.choice(DEFAULT_PROMPTS)}],
        max_completion_tokens=CONFIG.max_tokens,
        temperature=0.7,
        steering=steering,
    )
    _post(user, "/v1/chat/completions", name, body, ChatCompletion)


def plain_chat(user: SAEServeUser) -> None:
    _chat(user, "chat", [])


def steered_chat(user: SAEServeUser) -> None:
    feature = random.randrange(user.d_sae)
    _chat(user, "chat steered", [SteeringEntry(sae=user.sae, feature=feature, value=CONFIG.steer_value)])


def activations(user: SAEServeUser) -> None:
    body = ActivationsRequest(input=random.choice(DEFAULT_PROMPTS), saes=[user.sae], top_k=CONFIG.top_k)
    _post(user, "/v1/activations", "activations", body, ActivationsResponse)


SCENARIO_TASKS = {"chat": plain_chat, "steered": steered_chat, "activations": activations}


class SAEServeUser(HttpUser):
    """One simulated client; learns the served model and the SAE to use from the service at start."""

    wait_time = constant(CONFIG.wait_s)
    tasks = {SCENARIO_TASKS[name]: weight for name, weight in CONFIG.task_weights().items()}

    def on_start(self) -> None:
        if CONFIG.api_key:
            self.client.headers["Authorization"] = f"Bearer {CONFIG.api_key}"
        models = ModelList.model_validate(self.client.get("/v1/models", name="setup /v1/models").json())
        self.model = models.data[0].id
        saes = SAEList.model_validate(self.client.get("/v1/saes", name="setup /v1/saes").json()).data
        chosen = [s for s in saes if s.id == CONFIG.sae] if CONFIG.sae else saes[:1]
        if not chosen:
            raise RuntimeError(f"SAE {CONFIG.sae!r} is not loaded (loaded: {[s.id for s in saes]})")
        self.sae, self.d_sae = chosen[0].id, chosen[0].d_sae
