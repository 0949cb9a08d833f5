"""The request <-> worker codec: steering and capture specs as plain values in `SamplingParams.extra_args`.

vLLM serialises `extra_args` with msgspec, so only JSON-like values cross from the engine facade to its workers.
`encode` runs in the replica (engine facade), `decode` in every vLLM worker; both sides meet only here. Ops and
position modes travel as the integer values of `SteerOp` and `PositionMode`. Each steering or capturing request
carries a key of its own (vLLM may rename its request ids internally): the worker files its steering report and
captured rows under it, and the facade pops them under it when the request ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from sae.steering import SteerOp

if TYPE_CHECKING:
    from serve.specs import CaptureSpec, SteeringEntry

EXTRA_ARGS_KEY = "sae_serve"  # in SamplingParams.extra_args (per request) and vLLM's additional_config (per engine)


@dataclass(frozen=True)
class WorkerOptions:
    """The engine config's part that the workers read, carried in vLLM's `additional_config`."""

    static_steering: bool | None  # None: static exactly when vLLM captures CUDA graphs
    steering_slots: int  # steering entries one hook site holds in one step
    capture_sites: int  # hook points one step captures at
    sae_dtype: str | None  # torch dtype name of SAE weights; None: the model's dtype on CUDA, float32 elsewhere
    condition_slots: int = 32  # distinct steering conditions one step evaluates
    conditions_per_entry: int = 4  # the most conditions on one entry

    def to_additional_config(self) -> dict:
        return {EXTRA_ARGS_KEY: dataclasses.asdict(self)}

    @classmethod
    def from_additional_config(cls, additional: dict | None) -> WorkerOptions:
        return cls(**(additional or {})[EXTRA_ARGS_KEY])


class PositionMode(IntEnum):
    """Which token rows of a request an entry steers."""

    ALL = 0
    PROMPT = 1
    GENERATED = 2


@dataclass(frozen=True)
class EncodedCondition:
    """A gate of an entry: feature `feature` of SAE `sae` must be above (or, with `below`, below) `bound`."""

    sae: str
    feature: int
    below: bool
    bound: float


@dataclass(frozen=True)
class EncodedEntry:
    """One steering entry as the worker reads it; `index` is its place in the request's steering list. A feature
    entry has `sae` and `feature`; a vector entry `hook_point` and `vector` instead."""

    index: int
    sae: str | None
    feature: int
    op: SteerOp
    value: float
    positions: PositionMode
    hook_point: str | None = None
    vector: list[float] | None = None
    normalize: bool = False
    when: tuple[EncodedCondition, ...] = ()  # all must hold at a token for the entry to apply there


@dataclass
class EncodedCapture:
    """What to record per token for one capture request."""

    saes: list[str]
    top_k: int
    features: dict[str, list[int]] = field(default_factory=dict)
    include_generated: bool = False
    include_prompt: bool = True  # live features may leave the prompt's rows out


@dataclass
class EncodedRequest:
    """A request's key, steering and capture, decoded in the worker."""

    key: str
    steer: list[EncodedEntry]
    capture: EncodedCapture | None


def encode(entries: Iterable[SteeringEntry], capture: CaptureSpec | None, key: str) -> dict:
    """The `extra_args` of a request; empty when it neither steers nor captures."""
    out: dict[str, Any] = {}
    steer = [
        [
            e.sae,
            e.feature,
            int(SteerOp[e.op.upper()]),
            float(e.value),
            int(PositionMode[e.positions.upper()]),
            _extras(e),
        ]
        for e in entries
    ]
    if steer:
        out["steer"] = steer
    if capture is not None:
        out["capture"] = {
            "saes": list(capture.saes),
            "top_k": capture.top_k,
            "features": {k: list(v) for k, v in capture.features.items()},
            "include_generated": capture.include_generated,
        }
        if not capture.include_prompt:
            out["capture"]["include_prompt"] = False
    if not out:
        return {}
    out["key"] = key
    return {EXTRA_ARGS_KEY: out}


def _extras(e: SteeringEntry) -> dict[str, Any]:
    """The optional parts of an entry: its vector, its conditions."""
    out: dict[str, Any] = {}
    if e.vector is not None:
        out.update(hook_point=e.hook_point, vector=[float(v) for v in e.vector], normalize=e.normalize)
    if e.when:
        out["when"] = [[c.sae, c.feature, c.below is not None, c.above if c.below is None else c.below] for c in e.when]
    return out


def decode(extra_args: dict | None) -> EncodedRequest | None:
    """The worker's view of `encode`'s output; None for a request that neither steers nor captures."""
    spec = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if not spec:
        return None
    steer = [
        EncodedEntry(
            i,
            sae,
            -1 if feature is None else int(feature),
            SteerOp(op),
            float(value),
            PositionMode(positions),
            hook_point=extras.get("hook_point"),
            vector=extras.get("vector"),
            normalize=bool(extras.get("normalize", False)),
            when=tuple(EncodedCondition(str(c[0]), int(c[1]), bool(c[2]), float(c[3])) for c in extras.get("when", ())),
        )
        for i, (sae, feature, op, value, positions, extras) in enumerate(spec.get("steer", ()))
    ]
    cap = spec.get("capture")
    capture = None
    if cap:
        capture = EncodedCapture(
            saes=list(cap["saes"]),
            top_k=int(cap["top_k"]),
            features={k: list(v) for k, v in cap.get("features", {}).items()},
            include_generated=bool(cap.get("include_generated", False)),
            include_prompt=bool(cap.get("include_prompt", True)),
        )
    return EncodedRequest(str(spec["key"]), steer, capture)
