"""SAEConfig: everything needed to rebuild an SAE's forward pass, and nothing about training."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from . import architectures

DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class SAEConfig:
    """Shape, activation and input convention of one sparse autoencoder."""

    d_in: int
    """Width of the activation the SAE reads (the model's d_model)."""

    d_sae: int
    """Number of latents (dictionary size)."""

    architecture: str
    """Activation rule, a name in `sae.architectures.ARCHITECTURES` (relu, topk, batchtopk, jumprelu)."""

    hook_point: str
    """Where in the model the SAE reads and writes, e.g. "blocks.15.resid_post" ("" if unknown)."""

    model: str = ""
    """Name of the model the SAE was trained on ("" if unknown)."""

    k: int | None = None
    """Active latents per token for topk (required); training-time k for batchtopk."""

    b_dec_in_encoder: bool = True
    """Subtract b_dec from the (scaled) input before encoding."""

    input_scale: float = 1.0
    """Model activation × input_scale = SAE input; decoder output / input_scale = model space."""

    dtype: str = "float32"
    """Parameter dtype name, one of DTYPES."""

    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form, JSON-serialisable: training metrics, source format, provenance."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        architectures.get_architecture(self.architecture)
        if self.k is not None:
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
                raise ValueError(f"SAEConfig.k must be an int in [1, d_sae={self.d_sae}], got {self.k!r}")
        if architectures.needs_k(self.architecture) and self.k is None:
            raise ValueError(f"architecture {self.architecture!r} needs k")
        if not isinstance(self.hook_point, str) or not isinstance(self.model, str):
            raise ValueError("SAEConfig.hook_point and SAEConfig.model must be strings")
        if not isinstance(self.b_dec_in_encoder, bool):
            raise ValueError(f"SAEConfig.b_dec_in_encoder must be a bool, got {self.b_dec_in_encoder!r}")
        scale = self.input_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"SAEConfig.input_scale must be a finite positive number, got {scale!r}")
        self.input_scale = float(scale)
        if self.dtype not in DTYPES:
            raise ValueError(f"SAEConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"SAEConfig.metadata must be a dict, got {type(self.metadata).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SAEConfig keys: {', '.join(unknown)}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"missing SAEConfig keys: {', '.join(missing)}")
        return cls(**copy.deepcopy(data))
