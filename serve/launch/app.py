"""`build_app`: the Ray Serve application, from Python or from `serve run deploy/serve/config.yaml`.

    ingress (serve/http) --DeploymentHandle--> model (serve/replica, one engine each) --> directory (serve/directory)

The config is validated once here; deployments receive it as a plain dict.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from serve.config import ServiceConfig, is_loopback
from serve.http.auth import KeyStore

if TYPE_CHECKING:
    from serve.replica.deployment import EngineFactory

logger = logging.getLogger("sae_serve")

INGRESS_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def initial_saes(config: ServiceConfig) -> dict[str, str]:
    """SAE id -> folder to load at start: the registry's SAEs, then the engine config's (which win on a clash)."""
    from serve import registry as sae_registry

    saes: dict[str, str] = {}
    if config.sae_registry is not None and config.load_registry_at_start:
        saes.update({k: str(v) for k, v in sae_registry.scan(config.sae_registry).items()})
    saes.update({k: str(v) for k, v in config.engine.saes.items()})
    for sae_id in saes:
        bad = sae_registry.check_sae_id(sae_id)
        if bad:
            raise ValueError(bad)
    return saes


def published_versions(config: ServiceConfig) -> dict[str, int]:
    """Registry publish versions present at start: loaded (or deliberately not) by start-up, not by the watcher."""
    from serve import registry as sae_registry

    if config.sae_registry is None:
        return {}
    return {sae_id: entry.version for sae_id, entry in sae_registry.published(config.sae_registry).items()}


def check_binding(config: ServiceConfig, keys: KeyStore, host: str, warn: bool = True) -> None:
    """Without API keys the service may only listen on loopback; say loudly that auth is off."""
    if keys.enabled:
        return
    if not is_loopback(host):
        raise ValueError(
            f"no API keys are configured, so the service refuses to listen on {host!r}; set "
            f"{config.auth.api_keys_env} / auth.api_keys_file, or bind to 127.0.0.1"
        )
    if warn:
        logger.warning("sae-serve: no API keys configured, authentication is OFF (listening on %s only)", host)


def build_app(config: dict[str, Any] | ServiceConfig):
    """The application to `serve.run` on vLLM; also the `import_path` target of a serve config (`args` =
    ServiceConfig; Ray Serve wants a builder of exactly one parameter)."""
    from serve.replica.deployment import start_vllm_engine

    return application(config, start_vllm_engine)


def application(config: dict[str, Any] | ServiceConfig, engine_factory: EngineFactory):
    """The three deployments; `engine_factory` starts each model replica's engine."""
    from ray import serve

    from serve.directory.deployment import SAEDirectory
    from serve.http.ingress import Ingress
    from serve.replica.deployment import SAEModel

    config = config if isinstance(config, ServiceConfig) else ServiceConfig.model_validate(config)
    keys = KeyStore.from_config(config.auth)
    check_binding(config, keys, config.host)
    plain = config.model_dump(mode="json")

    # Replicas poll the directory every sae_sync_interval_s: access logs of those calls would drown the console.
    directory = (
        serve.deployment(SAEDirectory, name="SAEDirectory")
        .options(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
        .bind(initial_saes(config), published_versions(config))
    )
    model = (
        serve.deployment(SAEModel, name="SAEModel")
        .options(**config.model_serve_options())
        .bind(plain, directory, engine_factory)
    )
    ingress_options = config.ingress.serve_options()
    # The ingress never blocks its event loop, so Ray Serve may run its code and its handle's router on the
    # replica's main loop: two thread hops fewer per streamed message (Ray's "throughput optimized" settings).
    ingress_options["ray_actor_options"]["runtime_env"] = {"env_vars": INGRESS_ENV}
    ingress = serve.deployment(serve.ingress()(Ingress), name="SAEServeIngress").options(**ingress_options)
    return ingress.bind(plain, model, keys)
