"""SparseAutoencoder: the one inference-time SAE module every format is converted into.

Forward pass, in model space x [..., d_in]:
    pre  = (x * input_scale - b_dec * b_dec_in_encoder) @ W_enc + b_enc      [..., d_sae]
    f    = activate(pre)                      (architecture registry)      [..., d_sae]
    x_hat = (f @ W_dec + b_dec) / input_scale                               [..., d_in]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import architectures
from .config import SAEConfig

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _TORCH_DTYPES.values():
            raise ValueError(f"unsupported SAE dtype {name}")
        return name
    try:
        return _TORCH_DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported SAE dtype {name!r}; use one of {sorted(_TORCH_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SparseAutoencoder(nn.Module):
    """An SAE built from an SAEConfig; parameters start at zero until a state dict is loaded."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or torch_dtype(cfg.dtype)
        self.cfg = cfg
        self._activate = architectures.get_architecture(cfg.architecture)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))  # [d_sae]
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw))  # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))  # [d_in]
        if architectures.needs_threshold(cfg.architecture):
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **kw))  # [d_sae]
        else:
            self.register_parameter("threshold", None)

    @classmethod
    def from_state_dict(
        cls,
        cfg: SAEConfig,
        state_dict: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> SparseAutoencoder:
        sae = cls(cfg, device=device, dtype=dtype)
        sae.load_state_dict(state_dict, strict=True)
        return sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] (model space) -> pre-activations [..., d_sae]."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.input_scale != 1.0:
            x = x * self.cfg.input_scale
        if self.cfg.b_dec_in_encoder:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [..., d_sae] -> activations [..., d_sae]."""
        return self._activate(pre, self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> activations [..., d_sae]."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """activations [..., d_sae] -> reconstruction [..., d_in] in model space."""
        out = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.cfg.input_scale != 1.0:
            out = out / self.cfg.input_scale
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> reconstruction [..., d_in]."""
        return self.decode(self.encode(x))

    def encode_topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d_in] -> (values [..., k], indices [..., k]) of encode(x), largest first."""
        if not 0 < k <= self.cfg.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.cfg.d_sae}], got {k}")
        return self.encode(x).topk(k, dim=-1, sorted=True)

    @torch.no_grad()
    def folded_encoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d_in, d_sae], b [d_sae]) with pre_acts(x) == x @ W + b."""
        # at least float32, so that a bf16 SAE's folded bias is not rounded twice
        acc = torch.promote_types(self.W_enc.dtype, torch.float32)
        W_enc = self.W_enc.to(acc)
        W = W_enc * self.cfg.input_scale
        b = self.b_enc.to(acc)
        if self.cfg.b_dec_in_encoder:
            b = b - self.b_dec.to(acc) @ W_enc
        return W.to(self.W_enc.dtype), b.to(self.W_enc.dtype)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, hook_point={c.hook_point!r}"
