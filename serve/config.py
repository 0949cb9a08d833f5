"""Typed configuration of the Ray Serve service (`ServiceConfig`), validated once by `serve.launch.app.build_app`.

The canonical file is `deploy/serve/config.yaml`, a Ray Serve `serve run` config whose application `args` hold a
ServiceConfig; `sae-serve up` reads the same file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.engine.config import EngineConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of one deployment (replaces a fixed num_replicas)."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas started.")
    target_ongoing_requests: float = Field(default=32.0, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(default=30.0, ge=0, description="How long load must stay high before adding one.")
    downscale_delay_s: float = Field(default=600.0, ge=0, description="How long load must stay low to remove one.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling: min_replicas must be <= max_replicas")
        return self


class DeploymentSettings(_Strict):
    """Replica count, concurrency and resources of one Ray Serve deployment."""

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingConfig | None = Field(default=None, description="Autoscale instead of a fixed count.")
    max_ongoing_requests: int = Field(default=64, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Requests waiting per caller before it answers 503 at once (-1: unbounded)."
    )
    num_cpus: float = Field(default=1.0, ge=0, description="Logical CPUs Ray reserves per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs Ray reserves per replica (1 for a vLLM GPU engine).")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="STRICT_PACK",
        description="Model deployment with TP x PP > 1: how Ray places the replica's engine-worker bundles.",
    )

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options`."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }
        if self.num_gpus:
            opts["ray_actor_options"]["num_gpus"] = self.num_gpus
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def _ingress_defaults() -> DeploymentSettings:
    # The ingress is light; a high ceiling lets overload surface as our own 503 from the model handle.
    return DeploymentSettings(max_ongoing_requests=1024, max_queued_requests=-1, num_cpus=0.2)


def _model_defaults() -> DeploymentSettings:
    return DeploymentSettings(max_ongoing_requests=64, max_queued_requests=64, num_cpus=1.0)


class AuthConfig(_Strict):
    """Where API keys come from; keys are hashed at start and never logged. No keys at all: auth is off."""

    api_keys_file: Path | None = Field(default=None, description="File with one API key per line (# comments).")
    api_keys_env: str = Field(default="SAE_SERVE_API_KEYS", description="Env var with comma-separated API keys.")
    admin_keys_file: Path | None = Field(default=None, description="File with admin keys (SAE load/unload).")
    admin_keys_env: str = Field(default="SAE_SERVE_ADMIN_KEYS", description="Env var with comma-separated admin keys.")


class LimitsConfig(_Strict):
    """Bounds on one HTTP request (the steering bounds are EngineConfig's max_steering_entries and
    max_abs_steering_value)."""

    max_prompt_tokens: int = Field(default=1536, ge=1, description="Longest prompt, in tokens.")
    max_tokens: int = Field(default=1024, ge=1, description="Most tokens generated per choice.")
    max_n: int = Field(default=8, ge=1, description="Most choices (n) per request.")
    max_logprobs: int = Field(default=20, ge=0, description="Most top logprobs per token.")
    max_activation_top_k: int = Field(default=64, ge=0, description="Most top features per token in /v1/activations.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Largest request body accepted.")
    max_feature_top_n: int = Field(default=100, ge=1, description="Most logit-lens tokens per side in feature cards.")


class ServiceConfig(_Strict):
    """The whole service: engine, HTTP binding, deployments, auth, limits and the SAE registry."""

    engine: EngineConfig = Field(default_factory=EngineConfig, description="The vLLM engine of each model replica.")
    host: str = Field(default="127.0.0.1", description="HTTP bind address of `sae-serve up`.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port of `sae-serve up`.")
    direct_ingress: bool = Field(
        default=True,
        description="Where sae-serve starts Ray itself (`sae-serve up`): the ingress replica listens on host:port "
        "directly (Ray Serve direct ingress) instead of behind Ray's proxy; needs a single ingress replica.",
    )
    served_model_name: str = Field(default="SmolLM2-135M-Instruct", min_length=1, description="Name in /v1/models.")
    ingress: DeploymentSettings = Field(default_factory=_ingress_defaults, description="The HTTP (FastAPI) deployment.")
    model: DeploymentSettings = Field(default_factory=_model_defaults, description="The engine deployment.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API and admin keys.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-request bounds.")
    sae_registry: Path | None = Field(
        default=None,
        description="SAE registry folder (relative: to the working directory): loaded at start; POST /v1/saes "
        "paths must lie inside it.",
    )
    load_registry_at_start: bool = Field(default=True, description="Load every SAE of the registry at start.")
    sae_sync_interval_s: float = Field(default=2.0, gt=0, description="Seconds between model replicas' SAE-set checks.")
    watch_registry: bool = Field(
        default=True, description="Load what the trainer publishes into the registry (its manifest) without a restart."
    )
    registry_poll_interval_s: float = Field(
        default=0.25, gt=0, description="Seconds between checks of the registry manifest (one stat call each)."
    )
    stream_batch_ms: float = Field(
        default=50.0, ge=0, description="Shortest window over which a stream's deltas are merged into one message."
    )
    stream_messages_per_s: float = Field(
        default=64.0, gt=0, description="Stream messages per model replica per second; windows widen to keep to it."
    )

    @model_validator(mode="after")
    def _registry_absolute(self) -> ServiceConfig:
        if self.sae_registry is not None:
            self.sae_registry = self.sae_registry.expanduser().resolve()
        return self

    def model_serve_options(self) -> dict[str, Any]:
        """`Deployment.options` of the model deployment: with TP x PP engine workers, resources for all of them.

        With vLLM's `mp` backend (one node) the workers are processes of the replica, so the replica reserves their
        GPUs itself. With the `ray` backend they are Ray actors that vLLM places in the replica's placement group:
        one bundle per worker (its GPU, one CPU), the replica's own resources merged into the first bundle, as
        ray.serve.llm builds it.
        """
        opts = self.model.serve_options()
        workers = self.engine.tensor_parallel_size * self.engine.pipeline_parallel_size
        if workers == 1:
            return opts
        actor = opts["ray_actor_options"]
        gpus_per_worker = self.model.num_gpus
        if self.engine.distributed_executor_backend != "ray":
            if gpus_per_worker:
                actor["num_gpus"] = gpus_per_worker * workers
            return opts
        bundle = {"CPU": 1.0, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        bundles = [dict(bundle) for _ in range(workers)]
        bundles[0]["CPU"] += actor["num_cpus"]
        actor.pop("num_gpus", None)  # the replica itself needs no GPU: the workers have theirs
        opts["placement_group_bundles"] = bundles
        opts["placement_group_strategy"] = self.model.placement_strategy
        return opts

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServiceConfig:
        """The ServiceConfig of a `serve run` YAML (its first application's `args`) or of a bare ServiceConfig YAML."""
        return cls.model_validate(service_args(yaml.safe_load(Path(path).read_text()) or {}))


def service_args(doc: dict[str, Any]) -> dict[str, Any]:
    """The ServiceConfig mapping inside a parsed YAML document."""
    apps = doc.get("applications")
    if apps is None:
        return doc
    if len(apps) != 1:
        raise ValueError("the serve config must hold exactly one application (the sae-serve app)")
    return apps[0].get("args") or {}


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
