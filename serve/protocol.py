"""HTTP request and response bodies of every endpoint (pydantic only), and the messages of a generation stream from
the model replica to the ingress. The ingress parses requests into these models and hands them to the replica as
they are; the replica answers with these models.

OpenAI bodies accept OpenAI's documented fields; fields we cannot honour are accepted only at their neutral value
and otherwise rejected with a 400 naming the field, never silently ignored. Unknown fields are rejected everywhere,
as are non-finite numbers (JSON NaN / Infinity).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from serve.specs import FeatureSelection, SteeringEntry, SteeringReport


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _unicode(v: str) -> str:
    # JSON's \ud800 escapes decode to lone surrogates, which the tokenizer and vLLM's msgspec transport refuse.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text contains a lone UTF-16 surrogate (not valid Unicode)") from None
    return v


Text = Annotated[str, AfterValidator(_unicode)]
# The seeds vLLM's transport and torch's generators accept.
SEED_BOUNDS = {"ge": -(1 << 63), "le": (1 << 64) - 1}


def _not_supported(value: Any, neutral: tuple, what: str) -> Any:
    if value not in neutral:
        raise ValueError(f"{what} is not supported by this server")
    return value


# --- errors ---------------------------------------------------------------------------------------------------------


class ErrorDetail(_Body):
    message: str = Field(description="What went wrong, naming the field where one is at fault.")
    type: str = Field(description="OpenAI error type, e.g. invalid_request_error.")
    param: str | None = Field(default=None, description="The offending request field, e.g. steering[0].value.")
    code: str | None = Field(default=None, description="Machine-readable code, e.g. invalid_api_key.")


class ErrorResponse(_Body):
    error: ErrorDetail = Field(description="The error.")


# --- shared request parts -------------------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: bool = Field(default=False, description="Send a last chunk with token usage before [DONE].")


class TextPart(_Body):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: Text = Field(description="The text.")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Author of the message.")
    content: Text | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(default=None, description="Participant name (accepted; the chat template ignores it).")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_dict(self) -> dict[str, str]:
        # Chat templates know system/user/assistant; OpenAI's developer role is the newer name of system.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


Stop = Text | list[Text] | None


def _check_stop(v: Stop) -> Stop:
    if isinstance(v, list) and len(v) > 4:
        raise ValueError("at most 4 stop sequences")
    return v


MAX_LIVE_TOP_K = 64
MAX_LIVE_FEATURES = 64  # chosen features per SAE


def _bounded_selection(v: dict[str, list[int]]) -> dict[str, list[int]]:
    for sae_id, idx in v.items():
        if len(idx) > MAX_LIVE_FEATURES:
            raise ValueError(f"{sae_id!r}: at most {MAX_LIVE_FEATURES} chosen features per SAE, got {len(idx)}")
    return v


class LiveFeaturesRequest(_Body):
    """Per-token SAE features read while the answer is generated (OpenAI SDK: `extra_body={"sae_features": ...}`)."""

    saes: list[str] = Field(min_length=1, max_length=16, description="SAE ids to read (at most capture_sites sites).")
    top_k: int = Field(default=8, ge=0, le=MAX_LIVE_TOP_K, description="Top (feature, value) pairs per token and SAE.")
    features: Annotated[FeatureSelection, AfterValidator(_bounded_selection)] = Field(
        default_factory=dict, description="Per SAE id, feature indices whose values come with every token."
    )
    include_prompt: bool = Field(default=False, description="Also send the prompt's tokens (in the first chunk).")


class _SamplingFields(_Body):
    model: Text = Field(description="Served model name (see /v1/models).")
    n: int = Field(default=1, ge=1, description="Choices to generate.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, **SEED_BOUNDS, description="Seed for reproducible sampling.")
    stop: Stop = Field(default=None, description="Up to 4 sequences that end generation (not included).")
    stream: bool = Field(default=False, description="Stream server-sent events ending with data: [DONE].")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options (stream only).")
    user: str | None = Field(default=None, description="End-user id (accepted; not stored).")
    frequency_penalty: float = Field(default=0.0, description="Only 0 is supported.")
    presence_penalty: float = Field(default=0.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported (null or empty only).")
    steering: list[SteeringEntry] = Field(
        default_factory=list, description="SAE steering entries {sae, feature, value, op, positions} (extra_body)."
    )
    sae_features: LiveFeaturesRequest | None = Field(
        default=None, description="Live per-token SAE features beside the text (extra_body; needs n = 1)."
    )

    _check_stop = field_validator("stop")(_check_stop)

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalties(cls, v: float, info) -> float:
        return _not_supported(v, (0, 0.0), f"a non-zero {info.field_name}")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        return _not_supported(v or None, (None,), "logit_bias")

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# --- /v1/completions ------------------------------------------------------------------------------------------------


class CompletionRequest(_SamplingFields):
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(description="Text or token ids (one prompt).")
    max_tokens: int | None = Field(default=16, ge=1, description="Most tokens to generate per choice.")
    logprobs: int | None = Field(default=None, ge=0, description="Top logprobs per generated token.")

    def output_limit(self) -> int | None:
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_tokens"

    def top_logprobs_count(self) -> int | None:
        """Alternatives reported per generated token; None: no logprobs."""
        return self.logprobs

    echo: bool = Field(default=False, description="Only false is supported.")
    best_of: int | None = Field(default=None, description="Only null or equal to n is supported.")
    suffix: str | None = Field(default=None, description="Not supported (null only).")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        return _not_supported(v, (False,), "echo")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        return _not_supported(v, (None,), "suffix")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        return _not_supported(v, (None, info.data.get("n", 1)), "best_of other than n")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v


class CompletionLogprobs(_Body):
    tokens: list[str] = Field(description="Generated tokens.")
    token_logprobs: list[float] = Field(description="Log-probability of each generated token.")
    top_logprobs: list[dict[str, float]] = Field(description="Top alternatives per position.")
    text_offset: list[int] = Field(description="Character offset of each token in the choice's text.")


class CompletionChoice(_Body):
    index: int = Field(description="Choice index.")
    text: str = Field(description="Generated text (or its new part when streaming).")
    logprobs: CompletionLogprobs | None = Field(default=None, description="Per-token logprobs if asked.")
    finish_reason: Literal["stop", "length"] | None = Field(default=None, description="Why generation ended.")
    features: list[ActivationToken] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="With sae_features: per token delivered here, its SAE features (absent otherwise).",
    )


class Usage(_Body):
    prompt_tokens: int = Field(description="Tokens in the prompt.")
    completion_tokens: int = Field(description="Tokens generated, all choices.")
    total_tokens: int = Field(description="Sum of both.")


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Completion(_Body):
    id: str = Field(default_factory=lambda: _id("cmpl"), description="Response id.")
    object: Literal["text_completion"] = Field(default="text_completion", description="Object type.")
    created: int = Field(default_factory=lambda: int(time.time()), description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[CompletionChoice] = Field(description="Choices.")
    usage: Usage | None = Field(default=None, description="Token usage.")
    system_fingerprint: str | None = Field(default=None, description="Always null.")
    steering_report: list[SteeringReport] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Steered requests: what each steering entry did (on the last chunk of a stream; absent otherwise).",
    )


# --- /v1/chat/completions -------------------------------------------------------------------------------------------


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation.")
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate per choice.")
    logprobs: bool = Field(default=False, description="Return logprobs of generated tokens.")
    top_logprobs: int | None = Field(default=None, ge=0, description="Top alternatives per token (needs logprobs).")
    tools: list[Any] | None = Field(default=None, description="Not supported (null only).")
    tool_choice: Any = Field(default=None, description="Not supported (null or 'none').")
    parallel_tool_calls: bool | None = Field(default=None, description="Accepted (no tools are ever called).")
    functions: list[Any] | None = Field(default=None, description="Not supported (null only).")
    function_call: Any = Field(default=None, description="Not supported (null or 'none').")
    response_format: dict[str, Any] | None = Field(default=None, description="Only {'type': 'text'}.")
    modalities: list[str] | None = Field(default=None, description="Only ['text'].")
    audio: Any = Field(default=None, description="Not supported (null only).")
    prediction: Any = Field(default=None, description="Not supported (null only).")
    reasoning_effort: Any = Field(default=None, description="Not supported (null only).")
    web_search_options: Any = Field(default=None, description="Not supported (null only).")
    verbosity: Any = Field(default=None, description="Not supported (null only).")
    store: bool | None = Field(default=None, description="Only false/null: nothing is stored.")
    metadata: dict[str, str] | None = Field(default=None, description="Not supported (null only; nothing is stored).")
    service_tier: str | None = Field(default=None, description="Accepted: 'auto' or 'default'.")
    prompt_cache_key: str | None = Field(default=None, description="Accepted (caching is automatic here).")
    safety_identifier: str | None = Field(default=None, description="End-user id (accepted; not stored).")

    @field_validator(
        "tools", "functions", "audio", "prediction", "reasoning_effort", "web_search_options", "verbosity", "metadata"
    )
    @classmethod
    def _null_only(cls, v, info):
        return _not_supported(v, (None,), info.field_name)

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _none_choice(cls, v, info):
        return _not_supported(v, (None, "none"), info.field_name)

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v):
        return _not_supported(v, (None, {"type": "text"}), "a response_format other than text")

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, v):
        return _not_supported(v, (None, ["text"]), "a modality other than text")

    @field_validator("store")
    @classmethod
    def _no_store(cls, v):
        return _not_supported(v, (None, False), "store")

    @field_validator("service_tier")
    @classmethod
    def _tier(cls, v):
        return _not_supported(v, (None, "auto", "default"), f"service_tier {v!r}")

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def top_logprobs_count(self) -> int | None:
        """Alternatives reported per generated token; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TopLogprob(_Body):
    token: str = Field(description="Token text.")
    logprob: float = Field(description="Its log-probability.")
    bytes: list[int] | None = Field(description="UTF-8 bytes of the token text.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="Most likely tokens at this position.")


class ChatLogprobs(_Body):
    content: list[ChatTokenLogprob] | None = Field(description="One entry per generated token.")
    refusal: list[ChatTokenLogprob] | None = Field(default=None, description="Always null.")


class ChatResponseMessage(_Body):
    role: Literal["assistant"] = Field(default="assistant", description="Always assistant.")
    content: str | None = Field(description="Generated text.")
    refusal: str | None = Field(default=None, description="Always null.")


class ChatChoice(_Body):
    index: int = Field(description="Choice index.")
    message: ChatResponseMessage = Field(description="The answer.")
    logprobs: ChatLogprobs | None = Field(default=None, description="Per-token logprobs if asked.")
    finish_reason: Literal["stop", "length"] | None = Field(description="Why generation ended.")
    features: list[ActivationToken] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="With sae_features: per token delivered here, its SAE features (absent otherwise).",
    )


class ChatCompletion(_Body):
    id: str = Field(default_factory=lambda: _id("chatcmpl"), description="Response id.")
    object: Literal["chat.completion"] = Field(default="chat.completion", description="Object type.")
    created: int = Field(default_factory=lambda: int(time.time()), description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[ChatChoice] = Field(description="Choices.")
    usage: Usage | None = Field(default=None, description="Token usage.")
    system_fingerprint: str | None = Field(default=None, description="Always null.")
    steering_report: list[SteeringReport] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Steered requests: what each steering entry did (on the last chunk of a stream; absent otherwise).",
    )


class ChatDelta(_Body):
    role: Literal["assistant"] | None = Field(default=None, description="Set on a choice's first chunk.")
    content: str | None = Field(default=None, description="New text.")


class ChatChunkChoice(_Body):
    index: int = Field(description="Choice index.")
    delta: ChatDelta = Field(description="New output.")
    logprobs: ChatLogprobs | None = Field(default=None, description="Logprobs of the new tokens if asked.")
    finish_reason: Literal["stop", "length"] | None = Field(default=None, description="Set on the last chunk.")
    features: list[ActivationToken] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="With sae_features: per token delivered here, its SAE features (absent otherwise).",
    )


class ChatCompletionChunk(_Body):
    id: str = Field(description="Same id on every chunk of a response.")
    object: Literal["chat.completion.chunk"] = Field(default="chat.completion.chunk", description="Object type.")
    created: int = Field(description="Unix time.")
    model: str = Field(description="Served model name.")
    choices: list[ChatChunkChoice] = Field(description="Empty on the usage chunk.")
    usage: Usage | None = Field(default=None, description="On the usage chunk only.")
    system_fingerprint: str | None = Field(default=None, description="Always null.")
    steering_report: list[SteeringReport] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Steered requests: what each steering entry did (on the last chunk of a stream; absent otherwise).",
    )


# --- /v1/models -----------------------------------------------------------------------------------------------------


class ModelCard(_Body):
    id: str = Field(description="Served model name.")
    object: Literal["model"] = Field(default="model", description="Object type.")
    created: int = Field(description="Unix time the service started.")
    owned_by: str = Field(default="sae-serve", description="Owner.")


class ModelList(_Body):
    object: Literal["list"] = Field(default="list", description="Object type.")
    data: list[ModelCard] = Field(description="Models.")


# --- /v1/activations ------------------------------------------------------------------------------------------------


class ActivationsRequest(_Body):
    model: Text | None = Field(default=None, description="Served model name (optional).")
    input: Text | None = Field(default=None, description="Text to analyse (or give messages).")
    messages: list[ChatMessage] | None = Field(default=None, description="Chat to analyse, chat template applied.")
    add_generation_prompt: bool = Field(default=True, description="With messages: end with the assistant header.")
    saes: list[str] = Field(min_length=1, description="SAE ids to read features from.")
    top_k: int = Field(default=16, ge=0, description="Top features (index, value) per token and SAE.")
    features: FeatureSelection = Field(default_factory=dict, description="Per SAE, features reported per token.")
    max_tokens: int = Field(default=0, ge=0, description="Continue for this many tokens and include them.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature of the continuation.")
    seed: int | None = Field(default=None, **SEED_BOUNDS, description="Seed of the continuation.")
    steering: list[SteeringEntry] = Field(default_factory=list, description="Steering applied while reading.")


class FeatureValues(_Body):
    top: list[tuple[int, float]] = Field(description="Top (feature, value) pairs, largest first.")
    features: list[tuple[int, float]] = Field(description="(feature, value) of each requested feature.")


class ActivationToken(_Body):
    index: int = Field(description="Position in the sequence.")
    id: int = Field(description="Token id.")
    text: str = Field(description="Token text.")
    offset: tuple[int, int] = Field(description="[start, end) character offsets in text + generated_text.")
    generated: bool = Field(description="True for continuation tokens.")
    saes: dict[str, FeatureValues] | None = Field(
        description="Per SAE id; null for a token the model never read (the last generated one)."
    )


class ActivationsResponse(_Body):
    object: Literal["activations"] = Field(default="activations", description="Object type.")
    model: str = Field(description="Served model name.")
    saes: list[str] = Field(description="SAE ids read.")
    text: str = Field(description="The analysed text (chat template applied for messages).")
    generated_text: str = Field(description="The continuation, if any.")
    tokens: list[ActivationToken] = Field(description="One row per token.")
    usage: Usage = Field(description="Token usage.")
    steering_report: list[SteeringReport] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Steered requests: what each steering entry did (on the last chunk of a stream; absent otherwise).",
    )


# --- /v1/saes -------------------------------------------------------------------------------------------------------


class SAEInfo(_Body):
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


class SAEList(_Body):
    object: Literal["list"] = Field(default="list", description="Object type.")
    data: list[SAEInfo] = Field(description="Loaded SAEs.")


class SAECard(SAEInfo):
    model: str = Field(description="Model it was trained on ('' if unknown).")
    k: int | None = Field(description="Active features per token (topk).")
    metadata: dict[str, Any] = Field(description="Free-form metadata of its config.")
    card: dict[str, Any] | None = Field(description="card.json of its folder (training data, metrics), if any.")
    has_feature_stats: bool = Field(description="Whether feature densities and top contexts exist.")


class LogitLensToken(_Body):
    token: str = Field(description="Token text.")
    id: int = Field(description="Token id.")
    logit: float = Field(description="Decoder row · unembedding row.")


class FeatureCard(_Body):
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
    explanation: str | None = Field(default=None, description="A label written by the explain job (feature stats).")


class FeatureSummary(_Body):
    id: int = Field(description="Feature index.")
    density: float | None = Field(description="Fraction of tokens it fires on (feature stats).")
    max_activation: float | None = Field(description="Largest activation seen (feature stats).")
    activating_tokens: list[str] = Field(description="The active token of its top contexts, distinct, best first.")
    top_tokens: list[str] = Field(description="Logit-lens tokens it promotes most (feature stats).")
    explanation: str | None = Field(description="A label written by the explain job, if any.")


class FeatureList(_Body):
    object: Literal["list"] = Field(default="list", description="Object type.")
    sae: str = Field(description="SAE id.")
    total: int = Field(description="Features matching the query (all pages).")
    data: list[FeatureSummary] = Field(description="This page of matches.")


class SAELoadRequest(_Body):
    path: str = Field(min_length=1, description="SAE folder, relative to the registry (or absolute inside it).")
    id: str | None = Field(default=None, description="Id to serve it as (default: the folder name).")


class RegistryEntry(_Body):
    id: str = Field(description="SAE id in the registry manifest.")
    version: int = Field(description="Which publish of this id (1, 2, ...).")
    state: Literal["loaded", "rejected", "pending"] = Field(
        description="loaded: this publish is served; rejected: it failed validation (see error) and the previous "
        "SAEs keep serving; pending: not loaded (yet)."
    )
    error: str | None = Field(default=None, description="Why the last load of this id failed.")


class RegistryStatus(_Body):
    object: Literal["registry"] = Field(default="registry", description="Object type.")
    watching: bool = Field(description="Whether new publishes are loaded without a restart.")
    entries: list[RegistryEntry] = Field(description="The registry manifest's SAEs.")


class SAEDeleted(_Body):
    id: str = Field(description="SAE id.")
    object: Literal["sae"] = Field(default="sae", description="Object type.")
    deleted: bool = Field(default=True, description="Always true.")


class HealthResponse(_Body):
    status: Literal["ok"] = Field(default="ok", description="The engine answered a one-token generation.")


GenerationRequest = CompletionRequest | ChatCompletionRequest


# --- model replica -> ingress: one generation stream (plain dataclasses: one message per batch of tokens) ----------


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
    features: list[ActivationToken] | None = None  # live features of exactly these tokens (prompt ones first)


@dataclass
class StreamItem:
    """One message of a generation stream; the last one of a steered request carries its steering report."""

    prompt_tokens: int = 0
    deltas: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False
    steering_report: list[SteeringReport] | None = None
