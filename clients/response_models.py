"""Response bodies the SDK parses. Fields the service adds later are ignored rather than refused, so an older
client keeps working; tests/clients/test_contract.py checks these against the service's OpenAPI schemas.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Usage(_Response):
    prompt_tokens: int = Field(description="Tokens in the prompt.")
    completion_tokens: int = Field(description="Tokens generated, all choices.")
    total_tokens: int = Field(description="Sum of both.")


# --- models, health -------------------------------------------------------------------------------------------------


class SteeringReport(_Response):
    """What one steering entry of a request did."""

    index: int = Field(description="Place of the entry in the request's steering list.")
    sae: str | None = Field(description="SAE id of a feature entry (null for a vector).")
    feature: int | None = Field(description="Feature index of a feature entry (null for a vector).")
    steered_tokens: int = Field(description="Token rows this entry steered.")
    status: Literal["applied", "no_tokens", "not_applied", "sae_not_loaded", "over_capacity", "condition_not_met"] = (
        Field(description="applied | no_tokens | not_applied | sae_not_loaded | over_capacity | condition_not_met.")
    )


class ModelCard(_Response):
    id: str = Field(description="Served model name.")
    object: Literal["model"] = Field(default="model", description="Object type.")
    created: int = Field(description="Unix time the service started.")
    owned_by: str = Field(default="sae-serve", description="Owner.")


class ModelList(_Response):
    object: Literal["list"] = Field(default="list", description="Object type.")
    data: list[ModelCard] = Field(description="Models.")


class HealthResponse(_Response):
    status: Literal["ok"] = Field(default="ok", description="The engine answered a one-token generation.")


# --- completions ----------------------------------------------------------------------------------------------------


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(description="Generated tokens.")
    token_logprobs: list[float] = Field(description="Log-probability of each generated token.")
    top_logprobs: list[dict[str, float]] = Field(description="Top alternatives per position.")
    text_offset: list[int] = Field(description="Character offset of each token in the choice's text.")


class CompletionChoice(_Response):
    index: int = Field(description="Choice index.")
    text: str = Field(description="Generated text (or its new part when streaming).")
    logprobs: CompletionLogprobs | None = Field(default=None, description="Per-token logprobs if asked.")
    finish_reason: FinishReason | None = Field(default=None, description="Why generation ended.")
    features: list[ActivationToken] | None = Field(
        default=None, description="With sae_features: per token delivered here, its SAE features."
    )


class Completion(_Response):
    """A /v1/completions response, and each chunk of its stream."""

    id: str = Field(description="Response id.")
    object: Literal["text_completion"] = Field(default="text_completion", description="Object type.")
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[CompletionChoice] = Field(description="Choices (one per chunk when streaming).")
    usage: Usage | None = Field(default=None, description="Token usage.")
    steering_report: list[SteeringReport] | None = Field(
        default=None, description="Steered requests: what each steering entry did (the last chunk of a stream)."
    )
    system_fingerprint: str | None = Field(default=None, description="Always null.")

    @property
    def text(self) -> str:
        """Text of the first choice."""
        return self.choices[0].text if self.choices else ""


# --- chat -----------------------------------------------------------------------------------------------------------


class TopLogprob(_Response):
    token: str = Field(description="Token text.")
    logprob: float = Field(description="Its log-probability.")
    bytes: list[int] | None = Field(description="UTF-8 bytes of the token text.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="Most likely tokens at this position.")


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = Field(description="One entry per generated token.")
    refusal: list[ChatTokenLogprob] | None = Field(default=None, description="Always null.")


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = Field(default="assistant", description="Always assistant.")
    content: str | None = Field(description="Generated text.")
    refusal: str | None = Field(default=None, description="Always null.")


class ChatChoice(_Response):
    index: int = Field(description="Choice index.")
    message: ChatResponseMessage = Field(description="The answer.")
    logprobs: ChatLogprobs | None = Field(default=None, description="Per-token logprobs if asked.")
    finish_reason: FinishReason | None = Field(description="Why generation ended.")
    features: list[ActivationToken] | None = Field(
        default=None, description="With sae_features: per token delivered here, its SAE features."
    )


class ChatCompletion(_Response):
    id: str = Field(description="Response id.")
    object: Literal["chat.completion"] = Field(default="chat.completion", description="Object type.")
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[ChatChoice] = Field(description="Choices.")
    usage: Usage | None = Field(default=None, description="Token usage.")
    steering_report: list[SteeringReport] | None = Field(
        default=None, description="Steered requests: what each steering entry did (the last chunk of a stream)."
    )
    system_fingerprint: str | None = Field(default=None, description="Always null.")

    @property
    def text(self) -> str:
        """Content of the first choice."""
        return (self.choices[0].message.content or "") if self.choices else ""


class ChatDelta(_Response):
    role: Literal["assistant"] | None = Field(default=None, description="Set on a choice's first chunk.")
    content: str | None = Field(default=None, description="New text.")


class ChatChunkChoice(_Response):
    index: int = Field(description="Choice index.")
    delta: ChatDelta = Field(description="New output.")
    logprobs: ChatLogprobs | None = Field(default=None, description="Logprobs of the new tokens if asked.")
    finish_reason: FinishReason | None = Field(default=None, description="Set on the last chunk.")
    features: list[ActivationToken] | None = Field(
        default=None, description="With sae_features: per token delivered here, its SAE features."
    )


class ChatCompletionChunk(_Response):
    id: str = Field(description="Same id on every chunk of a response.")
    object: Literal["chat.completion.chunk"] = Field(default="chat.completion.chunk", description="Object type.")
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[ChatChunkChoice] = Field(description="Empty on the usage chunk.")
    usage: Usage | None = Field(default=None, description="On the usage chunk only.")
    steering_report: list[SteeringReport] | None = Field(
        default=None, description="Steered requests: what each steering entry did (the last chunk of a stream)."
    )
    system_fingerprint: str | None = Field(default=None, description="Always null.")

    @property
    def text(self) -> str:
        """New content of the first choice ('' on the usage chunk)."""
        return (self.choices[0].delta.content or "") if self.choices else ""


# --- activations ----------------------------------------------------------------------------------------------------


class FeatureValues(_Response):
    top: list[tuple[int, float]] = Field(description="Top (feature, value) pairs, largest first.")
    features: list[tuple[int, float]] = Field(description="(feature, value) of each requested feature.")


class ActivationToken(_Response):
    index: int = Field(description="Position in the sequence.")
    id: int = Field(description="Token id.")
    text: str = Field(description="Token text.")
    offset: tuple[int, int] = Field(description="[start, end) character offsets in text + generated_text.")
    generated: bool = Field(description="True for continuation tokens.")
    saes: dict[str, FeatureValues] | None = Field(
        description="Per SAE id; null for a token the model never read (the last generated one)."
    )


class ActivationsResponse(_Response):
    object: Literal["activations"] = Field(default="activations", description="Object type.")
    model: str = Field(description="Served model name.")
    saes: list[str] = Field(description="SAE ids read.")
    text: str = Field(description="The analysed text (chat template applied for messages).")
    generated_text: str = Field(description="The continuation, if any.")
    tokens: list[ActivationToken] = Field(description="One row per token.")
    usage: Usage = Field(description="Token usage.")
    steering_report: list[SteeringReport] | None = Field(
        default=None, description="Steered requests: what each steering entry did (the last chunk of a stream)."
    )


# --- SAEs -----------------------------------------------------------------------------------------------------------


class SAEInfo(_Response):
    id: str = Field(description="SAE id.")
    object: Literal["sae"] = Field(default="sae", description="Object type.")
    hook_point: str = Field(description="Where it reads and steers, e.g. blocks.10.resid_post.")
    architecture: str = Field(description="relu, topk, batchtopk or jumprelu.")
    d_in: int = Field(description="Input width (d_model).")
    d_sae: int = Field(description="Number of features.")
    version: str = Field(description="Tag that changes when its weights change.")
    bytes: int | None = Field(default=None, description="Bytes its weights take in the engine's worker, held once.")
    resident: bool = Field(
        default=True, description="On the device now; false: paged out to host memory under the SAE budget."
    )


class SAEList(_Response):
    object: Literal["list"] = Field(default="list", description="Object type.")
    data: list[SAEInfo] = Field(description="Loaded SAEs.")


class SAECard(SAEInfo):
    model: str = Field(description="Model it was trained on ('' if unknown).")
    k: int | None = Field(description="Active features per token (topk).")
    metadata: dict[str, Any] = Field(description="Free-form metadata of its config.")
    card: dict[str, Any] | None = Field(description="card.json of its folder (training data, metrics), if any.")
    has_feature_stats: bool = Field(description="Whether feature densities and top contexts exist.")


class LogitLensToken(_Response):
    token: str = Field(description="Token text.")
    id: int = Field(description="Token id.")
    logit: float = Field(description="Decoder row · unembedding row.")


class FeatureCard(_Response):
    object: Literal["sae.feature"] = Field(default="sae.feature", description="Object type.")
    sae: str = Field(description="SAE id.")
    feature: int = Field(description="Feature index.")
    decoder_norm: float = Field(description="L2 norm of its decoder row.")
    top_tokens: list[LogitLensToken] = Field(description="Tokens the direction promotes most.")
    bottom_tokens: list[LogitLensToken] = Field(description="Tokens it suppresses most.")
    density: float | None = Field(default=None, description="Fraction of tokens it fires on (feature stats).")
    mean_activation: float | None = Field(default=None, description="Mean activation where active (feature stats).")
    max_activation: float | None = Field(default=None, description="Largest activation seen (feature stats).")
    top_contexts: list[dict[str, Any]] | None = Field(default=None, description="Top-activating contexts.")
    explanation: str | None = Field(default=None, description="A label written by the explain job, if any.")


class SAEDeleted(_Response):
    id: str = Field(description="SAE id.")
    object: Literal["sae"] = Field(default="sae", description="Object type.")
    deleted: bool = Field(default=True, description="Always true.")
