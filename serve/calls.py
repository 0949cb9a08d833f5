"""What the ingress and the model deployment exchange through Ray: plain picklable dataclasses.

Expected failures travel as `CallError` values, not exceptions, so the ingress sees the status and message as sent
(Ray wraps a raised exception in its own types).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .steering_spec import SteeringEntry


@dataclass
class CallError:
    """An expected failure of a model-deployment call: HTTP status, message and the offending request field."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None


@dataclass
class PromptInput:
    """Exactly one of: text, token ids, or chat messages (role/content dicts, content a string)."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    add_generation_prompt: bool = True


@dataclass
class GenerateCall:
    """One completion / chat request, engine-side. max_tokens None: as many as the context allows."""

    prompt: PromptInput
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    steering: list[SteeringEntry] = field(default_factory=list)
    stream: bool = False
    sae_version: int = 0


@dataclass
class TokenLogprob:
    """A generated token's text, its log-probability and the top alternatives (text, logprob), best first."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class ChoiceDelta:
    """New output of choice `index` since the previous item."""

    index: int
    text: str
    num_tokens: int
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


@dataclass
class StreamItem:
    """One message of a generation stream; the first may carry only an error."""

    prompt_tokens: int = 0
    deltas: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False
    error: CallError | None = None


@dataclass
class ActivationsCall:
    """A `/v1/activations` request, engine-side."""

    prompt: PromptInput
    saes: list[str]
    top_k: int
    features: dict[str, list[int]]
    max_tokens: int = 0
    temperature: float = 0.0
    seed: int | None = None
    steering: list[SteeringEntry] = field(default_factory=list)
    sae_version: int = 0


@dataclass
class ActivationsOut:
    """Per-token features; `tokens` rows are dicts in the shape of `protocol.ActivationToken`."""

    text: str
    generated_text: str
    prompt_tokens: int
    completion_tokens: int
    tokens: list[dict]
