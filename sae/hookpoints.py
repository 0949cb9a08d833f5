"""Hook point names, and the one place that maps them onto model modules.

A hook point is `blocks.{L}.{site}`, the same for every model:
  - `attn_out`   — output of layer L's self-attention block (after o_proj), before it joins the residual;
  - `mlp_out`    — output of layer L's MLP, before it joins the residual;
  - `resid_post` — the residual stream after layer L (input of layer L+1).

Hugging Face transformers Llama (`hf_module_and_output`): `model.model.layers[L].self_attn` returns a tuple
whose [0] is attn_out; `.mlp` returns mlp_out; the decoder layer itself returns resid_post (a tensor in
transformers 5, a tuple with it at [0] in older versions).

vLLM Llama (`LlamaDecoderLayer.forward(positions, hidden_states, residual) -> (hidden_states, residual)`):
  - attn_out   = the output of `layer.self_attn` (the `o_proj` result);
  - mlp_out    = the output of `layer.mlp`;
  - resid_post = hidden_states + residual of the pair the layer returns: vLLM fuses each residual add
    into the next RMSNorm (`input_layernorm(hidden_states, residual)`), so neither tensor alone is the
    residual stream. Hook code must add them (and write steering back into one of them).
TransformerLens names (`blocks.L.hook_resid_post`, ...) convert with `HookPoint.from_transformer_lens`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SITES = ("attn_out", "mlp_out", "resid_post")

_NAME = re.compile(r"blocks\.(0|[1-9][0-9]*)\.([a-z_]+)")
_TL_SITES = {"hook_resid_post": "resid_post", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}


@dataclass(frozen=True)
class HookPoint:
    """A position in a decoder-only transformer: the `site` output of layer `layer`."""

    layer: int
    """Decoder layer index, from 0."""

    site: str
    """One of SITES."""

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"hook point layer must be a non-negative int, got {self.layer!r}")
        if self.site not in SITES:
            raise ValueError(f"hook point site must be one of {SITES}, got {self.site!r}")

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        """`"blocks.15.resid_post"` -> HookPoint(15, "resid_post"); ValueError otherwise."""
        m = _NAME.fullmatch(name) if isinstance(name, str) else None
        if m is None or m.group(2) not in SITES:
            raise ValueError(f"malformed hook point {name!r}; expected 'blocks.<layer>.<site>' with site in {SITES}")
        return cls(int(m.group(1)), m.group(2))

    @classmethod
    def from_transformer_lens(cls, name: str) -> HookPoint:
        """TransformerLens name -> HookPoint; our own names pass through; ValueError if not representable."""
        m = _NAME.fullmatch(name) if isinstance(name, str) else None
        if m is not None:
            layer, site = int(m.group(1)), m.group(2)
            if site in SITES:
                return cls(layer, site)
            if site in _TL_SITES:
                return cls(layer, _TL_SITES[site])
            # resid_pre of layer L is exactly resid_post of layer L-1; layer 0's is the embedding.
            if site == "hook_resid_pre" and layer > 0:
                return cls(layer - 1, "resid_post")
        raise ValueError(f"hook {name!r} has no equivalent among blocks.<layer>.{{{', '.join(SITES)}}}")

    def __str__(self) -> str:
        return f"blocks.{self.layer}.{self.site}"


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def hf_module_and_output(model: nn.Module, hp: HookPoint | str) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """For a transformers Llama-family causal LM: (module to forward-hook, module output -> activation
    [..., d_model])."""
    hp = HookPoint.parse(hp) if isinstance(hp, str) else hp
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers; not a Llama-style transformers model")
    if hp.layer >= len(layers):
        raise ValueError(f"hook point {hp} is out of range: the model has {len(layers)} layers")
    layer = layers[hp.layer]
    if hp.site == "attn_out":
        return layer.self_attn, _first
    if hp.site == "mlp_out":
        return layer.mlp, _first
    return layer, _first
