"""What the load test sends, read from the environment so that `locust -f clients/locustfile.py` and
`sae-serve loadtest` configure it the same way."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

SCENARIOS = ("chat", "steered", "activations")
"""Request kinds: plain chat, chat steered on random features of a loaded SAE, per-token activations."""
MIXED = "mixed"

DEFAULT_PROMPTS = (
    "Tell me about the sea.",
    "What is the capital of France?",
    "Write a short poem about autumn.",
    "How do I boil an egg?",
    "Name three animals that live in the desert.",
    "Explain what a computer does in one sentence.",
)

_ENV = "SAE_SERVE_LOAD_"


def _weights(text: str) -> dict[str, int]:
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in SCENARIOS or not value.isdigit():
            raise ValueError(f"{_ENV}WEIGHTS: {part!r} is not SCENARIO=INT with SCENARIO in {SCENARIOS}")
        weights[name] = int(value)
    if not any(weights.values()):
        raise ValueError(f"{_ENV}WEIGHTS: no scenario has a positive weight")
    return weights


@dataclass(frozen=True)
class LoadConfig:
    """One load test's request mix (env SAE_SERVE_LOAD_<FIELD>, API key from SAE_SERVE_API_KEY)."""

    scenario: str = MIXED
    """chat | steered | activations | mixed."""
    weights: dict[str, int] = field(default_factory=lambda: {"chat": 2, "steered": 2, "activations": 1})
    """Relative frequency of each scenario in `mixed`, e.g. chat=2,steered=2,activations=1."""
    max_tokens: int = 16
    """Tokens generated per chat request."""
    sae: str | None = None
    """SAE to steer and read (default: the first one /v1/saes lists)."""
    steer_value: float = 8.0
    """Coefficient of the `add` steering of a random feature."""
    top_k: int = 8
    """Top features per token of the activations requests."""
    wait_s: float = 0.0
    """Pause of each simulated user between requests."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer key of the requests (never printed)."""

    def __post_init__(self):
        if self.scenario not in (*SCENARIOS, MIXED):
            raise ValueError(f"scenario must be one of {(*SCENARIOS, MIXED)}, not {self.scenario!r}")
        if self.max_tokens < 1 or self.top_k < 0 or self.wait_s < 0:
            raise ValueError("max_tokens must be >= 1, top_k and wait_s >= 0")

    def task_weights(self) -> dict[str, int]:
        """The scenarios this run sends, with their weights."""
        if self.scenario != MIXED:
            return {self.scenario: 1}
        return {name: w for name, w in self.weights.items() if w > 0}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LoadConfig:
        kw: dict = {}
        if f"{_ENV}SCENARIO" in env:
            kw["scenario"] = env[f"{_ENV}SCENARIO"]
        if f"{_ENV}WEIGHTS" in env:
            kw["weights"] = _weights(env[f"{_ENV}WEIGHTS"])
        for name, kind in (("max_tokens", int), ("steer_value", float), ("top_k", int), ("wait_s", float)):
            if f"{_ENV}{name.upper()}" in env:
                kw[name] = kind(env[f"{_ENV}{name.upper()}"])
        return cls(sae=env.get(f"{_ENV}SAE") or None, api_key=env.get("SAE_SERVE_API_KEY") or None, **kw)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` return this config."""
        env = {
            f"{_ENV}SCENARIO": self.scenario,
            f"{_ENV}WEIGHTS": ",".join(f"{k}={v}" for k, v in self.weights.items()),
            f"{_ENV}MAX_TOKENS": str(self.max_tokens),
            f"{_ENV}STEER_VALUE": str(self.steer_value),
            f"{_ENV}TOP_K": str(self.top_k),
            f"{_ENV}WAIT_S": str(self.wait_s),
        }
        if self.sae:
            env[f"{_ENV}SAE"] = self.sae
        if self.api_key:
            env["SAE_SERVE_API_KEY"] = self.api_key
        return env
