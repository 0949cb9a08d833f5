"""Request bodies the SDK sends, validated before they leave the client (unknown fields are rejected, as the
server rejects them). Mirrors the service's OpenAPI schemas; tests/clients/test_contract.py keeps them in step.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SteeringOp = Literal["add", "clamp", "mul", "h_bias", "ablate", "cap", "set"]
Positions = Literal["all", "prompt", "generated"]
STEERING_OPS: tuple[str, ...] = ("add", "clamp", "mul", "h_bias", "ablate", "cap", "set")
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")

# SAE:FEATURE[@OP][@POSITIONS]=VALUE, e.g. l15:1234=+8, l15:1234@clamp=3, toy:7@mul@generated=0.5
_STEER_SYNTAX = re.compile(r"^(?P<sae>.+):(?P<feature>\d+)(?P<suffixes>(@[a-z_]+)*)=(?P<value>[-+]?[^=]+)$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SteeringCondition(_Body):
    """A gate on a steering entry: it applies at a token only where this feature's activation is above `above` (or
    below `below`)."""

    model_config = ConfigDict(frozen=True)

    sae: str = Field(min_length=1, description="Id of a loaded SAE at or before the entry's hook point.")
    feature: int = Field(ge=0, description="Feature (latent) index in that SAE.")
    above: float | None = Field(default=None, description="The entry applies where the activation is > this.")
    below: float | None = Field(default=None, description="The entry applies where the activation is < this.")


class SteeringEntry(_Body):
    """One intervention of one request, on an SAE feature (`sae` + `feature`) or on a raw direction (`vector` +
    `hook_point`; ops add, ablate, cap, set)."""

    model_config = ConfigDict(frozen=True)

    sae: str | None = Field(default=None, min_length=1, description="Id of a loaded SAE (feature entries).")
    feature: int | None = Field(default=None, ge=0, description="Feature (latent) index in that SAE.")
    vector: list[float] | None = Field(
        default=None, min_length=1, description="A direction of d_model floats, instead of an SAE feature."
    )
    hook_point: str | None = Field(
        default=None, description="Where a vector steers, e.g. blocks.10.resid_post (vector entries only)."
    )
    normalize: bool = Field(
        default=False,
        description="add: scale the direction to unit length first; ablate, cap and set always use the unit direction.",
    )
    value: float = Field(
        default=0.0,
        description="add: coefficient; clamp: target activation; mul: factor; h_bias: pre-activation bias; cap: "
        "largest allowed projection; set: projection to pin; ablate: unused.",
    )
    op: SteeringOp = Field(default="add", description="add | clamp | mul | h_bias | ablate | cap | set.")
    positions: Positions = Field(default="all", description="Which tokens are steered: all, prompt or generated.")
    when: list[SteeringCondition] = Field(
        default_factory=list,
        max_length=4,
        description="Conditions (combined with AND): the entry applies only at tokens where all hold.",
    )

    @classmethod
    def parse(cls, text: str) -> SteeringEntry:
        """`SAE:FEATURE[@OP][@POSITIONS]=VALUE` (the CLI's --steer syntax) -> an entry; ValueError if malformed."""
        m = _STEER_SYNTAX.match(text.strip())
        if m is None:
            raise ValueError(f"steering {text!r}: expected SAE:FEATURE[@OP][@POSITIONS]=VALUE, e.g. l15:1234@clamp=3")
        fields: dict = {"sae": m["sae"], "feature": int(m["feature"])}
        for word in filter(None, m["suffixes"].split("@")):
            key = "op" if word in STEERING_OPS else "positions" if word in POSITIONS else None
            if key is None or key in fields:
                raise ValueError(
                    f"steering {text!r}: @{word} is not a (single) op {STEERING_OPS} or positions {POSITIONS}"
                )
            fields[key] = word
        try:
            fields["value"] = float(m["value"])
        except ValueError:
            raise ValueError(f"steering {text!r}: {m['value']!r} is not a number") from None
        return cls(**fields)


class StreamOptions(_Body):
    include_usage: bool = Field(default=False, description="Send a last chunk with token usage before [DONE].")


class TextPart(_Body):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Author of the message.")
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(default=None, description="Participant name.")


class LiveFeatures(_Body):
    """Per-token SAE features read while the answer is generated, sent with it (needs n = 1)."""

    saes: list[str] = Field(min_length=1, max_length=16, description="SAE ids to read.")
    top_k: int = Field(default=8, ge=0, le=64, description="Top (feature, value) pairs per token and SAE.")
    features: dict[str, list[Annotated[int, Field(ge=0)]]] = Field(
        default_factory=dict, description="Per SAE id, feature indices whose values come with every token."
    )
    include_prompt: bool = Field(default=False, description="Also send the prompt's tokens (in the first chunk).")

    @classmethod
    def parse(cls, specs: list[str], top_k: int = 8, include_prompt: bool = False) -> LiveFeatures:
        """From CLI words SAE[:i,j]: the SAEs to read and, after the colon, features followed at every token."""
        saes, features = [], {}
        for spec in specs:
            sae, _, chosen = spec.partition(":")
            saes.append(sae)
            if chosen:
                try:
                    features[sae] = [int(f) for f in chosen.split(",")]
                except ValueError:
                    raise ValueError(f"features {spec!r}: expected SAE[:i,j] with integer features") from None
        return cls(saes=saes, top_k=top_k, features=features, include_prompt=include_prompt)


class _Sampling(_Body):
    model: str = Field(description="Served model name (the client fills it in from /v1/models when not given).")
    n: int = Field(default=1, ge=1, description="Choices to generate.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 sequences that end generation.")
    stream: bool = Field(default=False, description="Stream server-sent events (set by the stream methods).")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options (stream only).")
    steering: list[SteeringEntry] = Field(default_factory=list, description="SAE steering entries.")
    sae_features: LiveFeatures | None = Field(default=None, description="Live per-token SAE features (n = 1).")


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate per choice.")
    logprobs: bool = Field(default=False, description="Return logprobs of generated tokens.")
    top_logprobs: int | None = Field(default=None, ge=0, description="Top alternatives per token (needs logprobs).")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(description="Text or token ids (one prompt).")
    max_tokens: int | None = Field(default=16, ge=1, description="Most tokens to generate per choice.")
    logprobs: int | None = Field(default=None, ge=0, description="Top logprobs per generated token.")


class ActivationsRequest(_Body):
    """POST /v1/activations: give exactly one of input and messages."""

    model: str | None = Field(default=None, description="Served model name (optional).")
    input: str | None = Field(default=None, description="Text to analyse.")
    messages: list[ChatMessage] | None = Field(default=None, description="Chat to analyse, chat template applied.")
    add_generation_prompt: bool = Field(default=True, description="With messages: end with the assistant header.")
    saes: list[str] = Field(min_length=1, description="SAE ids to read features from.")
    top_k: int = Field(default=16, ge=0, description="Top features (index, value) per token and SAE.")
    features: dict[str, list[Annotated[int, Field(ge=0)]]] = Field(
        default_factory=dict, description="Per SAE, features reported for every token."
    )
    max_tokens: int = Field(default=0, ge=0, description="Continue for this many tokens and include them.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature of the continuation.")
    seed: int | None = Field(default=None, description="Seed of the continuation.")
    steering: list[SteeringEntry] = Field(default_factory=list, description="Steering applied while reading.")


class SAELoadRequest(_Body):
    """POST /v1/saes (admin)."""

    path: str = Field(min_length=1, description="SAE folder, relative to the service's registry.")
    id: str | None = Field(default=None, description="Id to serve it as (default: the folder name).")
