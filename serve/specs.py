"""Steering and capture specs: the one representation of a steering entry, shared by the wire protocol, the replica
and the engine facade, and their validation against the loaded SAEs (pure pydantic; the engine's codec carries
them to the workers).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.errors import SpecError

SteeringOp = Literal["add", "clamp", "mul", "h_bias", "ablate", "cap", "set"]
LATENT_OPS = ("clamp", "mul", "h_bias")  # act on an SAE feature's activation, so they need a feature
MAX_CONDITIONS = 4  # per steering entry
Positions = Literal["all", "prompt", "generated"]
FeatureSelection = dict[str, list[Annotated[int, Field(ge=0)]]]  # SAE id -> feature indices


class SteeringCondition(BaseModel):
    """A gate on a steering entry: the entry applies at a token only where this SAE feature's activation, read at its
    hook point before that site's own steering, is above `above` (or below `below`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    sae: str = Field(min_length=1, description="Id of a loaded SAE at or before the entry's hook point.")
    feature: int = Field(ge=0, description="Feature (latent) index in that SAE.")
    above: float | None = Field(default=None, description="The entry applies where the activation is > this.")
    below: float | None = Field(default=None, description="The entry applies where the activation is < this.")

    @model_validator(mode="after")
    def _one_bound(self) -> SteeringCondition:
        if (self.above is None) == (self.below is None):
            raise ValueError("a condition has exactly one of above and below")
        return self


class SteeringEntry(BaseModel):
    """One intervention, on an SAE feature (`sae` + `feature`) or on a raw direction in the residual space
    (`vector` + `hook_point`). The ops are defined in `sae/steering.py`: add, and the residual-space ops ablate, cap
    and set, act on a direction (the vector, or the feature's decoder row); clamp, mul and h_bias act on a feature's
    activation."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

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
        max_length=MAX_CONDITIONS,
        description="Conditions (one object or a list, combined with AND): the entry applies only at tokens where "
        "all hold.",
    )

    @field_validator("when", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _one_target(self) -> SteeringEntry:
        if self.vector is None and self.hook_point is None:
            if self.sae is None or self.feature is None:
                raise ValueError(
                    "a steering entry names an SAE feature (sae + feature) or a vector (vector + hook_point)"
                )
        elif self.sae is not None or self.feature is not None:
            raise ValueError("a steering entry names an SAE feature (sae + feature) or a vector, not both")
        elif self.vector is None or self.hook_point is None:
            raise ValueError("a vector entry needs both vector and hook_point")
        elif self.op in LATENT_OPS:
            raise ValueError(
                f"op {self.op} acts on an SAE feature's activation; a vector takes add, ablate, cap or set"
            )
        return self

    @property
    def is_vector(self) -> bool:
        return self.vector is not None

    def label(self) -> str:
        """How logs and metrics name the entry's target."""
        return f"vector@{self.hook_point}" if self.is_vector else f"{self.sae} feature {self.feature}"


class CaptureSpec(BaseModel):
    """Which feature activations to record per token."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    saes: list[str] = Field(min_length=1, description="SAE ids to capture at.")
    top_k: int = Field(default=16, ge=0, le=256, description="Top features (index, value) recorded per token and SAE.")
    features: FeatureSelection = Field(
        default_factory=dict, description="Per SAE id, feature indices whose values are recorded for every token."
    )
    include_generated: bool = Field(default=False, description="Also record generated tokens, not only the prompt.")
    include_prompt: bool = Field(default=True, description="Record the prompt's tokens (live features may skip them).")


@dataclass(frozen=True)
class SAEMeta:
    """What the driver knows of a loaded SAE, enough to validate specs without touching tensors."""

    sae_id: str
    hook_point: str
    d_in: int
    d_sae: int
    architecture: str
    version: str
    resident_bytes: int = 0  # of its weights in the worker (per rank that holds its layer)
    resident: bool = True  # on the device now (False: paged out to host memory under the SAE budget)


def known_feature(saes: dict[str, SAEMeta], sae_id: str, feature: int, field: str) -> SAEMeta:
    """The SAE's metadata, if it is loaded and has the feature; else a SpecError naming `field`.sae or .feature."""
    meta = saes.get(sae_id)
    if meta is None:
        known = ", ".join(sorted(saes)) or "none loaded"
        raise SpecError(f"{field}.sae: unknown SAE {sae_id!r} (loaded: {known})", f"{field}.sae")
    if feature >= meta.d_sae:
        raise SpecError(
            f"{field}.feature: {feature} out of range for SAE {sae_id!r} with {meta.d_sae} features", f"{field}.feature"
        )
    return meta


def validate_steering(
    entries: list[SteeringEntry],
    saes: dict[str, SAEMeta],
    max_abs_value: float,
    static: bool = False,
) -> None:
    """Values, and feature entries against the loaded SAEs (vector entries are checked against the model by the
    engine). `static`: the engine steers inside captured CUDA graphs, where latent ops on TopK SAEs cannot run."""
    h_biased: dict[tuple[str, int], int] = {}
    for i, e in enumerate(entries):
        if not math.isfinite(e.value) or abs(e.value) > max_abs_value:
            raise SpecError(
                f"steering[{i}].value: must be finite with |value| <= {max_abs_value}", f"steering[{i}].value"
            )
        if e.vector is not None:
            continue
        assert e.sae is not None and e.feature is not None  # the entry's own validator
        meta = known_feature(saes, e.sae, e.feature, f"steering[{i}]")
        if static and e.op in LATENT_OPS and meta.architecture == "topk":
            raise SpecError(
                f"steering[{i}].op: {e.op} on a TopK SAE needs a full encode of every row (its k-th largest "
                f"pre-activation), which this engine does not run inside its CUDA graphs; use add, or an engine "
                f"with enforce_eager: true",
                f"steering[{i}].op",
            )
        if e.op == "h_bias":
            first = h_biased.setdefault((e.sae, e.feature), i)
            if first != i:
                raise SpecError(
                    f"steering[{i}]: a second h_bias on feature {e.feature} of {e.sae!r} (first: steering[{first}]); "
                    f"biases of one latent do not add after its activation: send their sum in one entry",
                    f"steering[{i}]",
                )


def validate_capture(
    spec: CaptureSpec, saes: dict[str, SAEMeta], max_sites: int | None = None, field: str = ""
) -> None:
    """`field`: the request field the spec came from (e.g. `sae_features.`), prefixed to the names in errors."""
    for i, sae_id in enumerate(spec.saes):
        if sae_id not in saes:
            known = ", ".join(sorted(saes)) or "none loaded"
            raise SpecError(f"{field}saes[{i}]: unknown SAE {sae_id!r} (loaded: {known})", f"{field}saes[{i}]")
    sites = {saes[s].hook_point for s in spec.saes}
    if max_sites is not None and len(sites) > max_sites:
        raise SpecError(
            f"{field}saes: {len(sites)} hook points; this engine captures at most {max_sites} at once", f"{field}saes"
        )
    for sae_id, idx in spec.features.items():
        if sae_id not in spec.saes:
            raise SpecError(f"{field}features: SAE {sae_id!r} is not among the captured saes", f"{field}features")
        bad = [i for i in idx if i >= saes[sae_id].d_sae]
        if bad:
            raise SpecError(
                f"{field}features[{sae_id!r}]: indices {bad} out of range ({saes[sae_id].d_sae} features)",
                f"{field}features",
            )


def steering_cache_salt(entries: list[SteeringEntry], saes: dict[str, SAEMeta]) -> str | None:
    """Prefix-cache salt: equal specs (on equal SAE versions) share KV blocks, different specs never do."""
    if not entries:
        return None
    canon = sorted(
        json.dumps(
            [e.hook_point, _vector_digest(e.vector), e.normalize]
            if e.vector is not None
            else [e.sae, _version(saes, e.sae), e.feature]
        )
        + json.dumps([e.op, repr(float(e.value)), e.positions])
        + json.dumps(
            [[c.sae, saes[c.sae].version if c.sae in saes else "", c.feature, c.above, c.below] for c in e.when]
        )
        for e in entries
    )
    return "steer-" + hashlib.sha256(json.dumps(canon).encode()).hexdigest()[:32]


def _version(saes: dict[str, SAEMeta], sae_id: str | None) -> str:
    meta = saes.get(sae_id or "")
    return meta.version if meta is not None else ""


def _vector_digest(vector: list[float]) -> str:
    return hashlib.sha256(json.dumps([repr(float(v)) for v in vector]).encode()).hexdigest()


ReportStatus = Literal["applied", "no_tokens", "not_applied", "sae_not_loaded", "over_capacity", "condition_not_met"]


class SteeringReport(BaseModel):
    """What one steering entry of a request did: the token rows it steered (summed over the n choices; a row the
    engine computed twice, after preemption, counts twice) and a status:
    applied (steered_tokens > 0); no_tokens (its positions matched no token the model computed, e.g. `generated`
    with a one-token answer); not_applied (it should have steered tokens but steered none: logged as an error);
    sae_not_loaded (its SAE was unloaded after the request was accepted: nothing was steered); over_capacity (it
    was left out of at least one step for want of a slot); condition_not_met (its `when` held at no computed token).
    A gated entry counts the rows the engine actually steered; the others count the rows planned for them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(description="Place of the entry in the request's steering list.")
    sae: str | None = Field(description="SAE id of a feature entry (null for a vector).")
    feature: int | None = Field(description="Feature index of a feature entry (null for a vector).")
    steered_tokens: int = Field(description="Token rows this entry steered.")
    status: ReportStatus = Field(
        description="applied | no_tokens | not_applied | sae_not_loaded | over_capacity | condition_not_met."
    )
