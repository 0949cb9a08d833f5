"""Prometheus metrics of the ingress, named in vLLM's style (`sae_serve:...`), in a registry of their own.

Each ingress replica exports its own counters; with several ingress replicas, scrape each (or sum in Prometheus).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)

VECTOR_LABEL = "vector"  # the `sae` label of a vector entry


class ServiceMetrics:
    """All service metrics; `render()` is the body of GET /metrics."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series double the output and no dashboard reads them
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sae_serve:requests",
            "HTTP requests finished, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "sae_serve:request_errors",
            "Requests answered with an error, by endpoint and type.",
            ["endpoint", "type"],
            registry=r,
        )
        self.latency = Histogram(
            "sae_serve:e2e_request_latency_seconds",
            "Time from request to last byte.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sae_serve:time_to_first_token_seconds",
            "Time from request to the first token.",
            ["endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("sae_serve:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("sae_serve:generation_tokens", "Tokens generated.", registry=r)
        self.steered = Counter("sae_serve:steered_requests", "Requests steered with each SAE.", ["sae"], registry=r)
        self.steered_tokens = Counter(
            "sae_serve:steered_tokens", "Token rows steered, by SAE (steering reports).", ["sae"], registry=r
        )
        self.unapplied_entries = Counter(
            "sae_serve:unapplied_steering_entries",
            "Steering entries that steered no token they should have, by SAE and status.",
            ["sae", "status"],
            registry=r,
        )
        self.loaded_saes = Gauge("sae_serve:loaded_saes", "SAEs currently served.", registry=r)
        self.sae_bytes = Gauge(
            "sae_serve:sae_resident_bytes",
            "Bytes of each served SAE's weights on the engine's device (0 while paged out to host memory).",
            ["sae"],
            registry=r,
        )
        self.sae_events = Counter(
            "sae_serve:sae_hot_load_events",
            "Admin SAE loads/unloads, by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def served_saes(self, saes) -> None:
        """The SAE gauges from a list of `serve.protocol.SAEInfo`."""
        self.loaded_saes.set(len(saes))
        self.sae_bytes.clear()
        for s in saes:
            if s.bytes is not None:
                self.sae_bytes.labels(s.id).set(s.bytes if s.resident else 0)

    def count_report(self, report) -> None:
        """The counts of one request's steering report (a list of `serve.specs.SteeringReport`)."""
        for entry in report:
            if entry.steered_tokens:
                self.steered_tokens.labels(entry.sae or VECTOR_LABEL).inc(entry.steered_tokens)
            if entry.status in ("not_applied", "sae_not_loaded", "over_capacity"):
                self.unapplied_entries.labels(entry.sae or VECTOR_LABEL, entry.status).inc()
