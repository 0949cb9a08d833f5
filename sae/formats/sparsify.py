"""EleutherAI sparsify folders: `cfg.json` (with `expansion_factor` / `num_latents`) + `sae.safetensors`.

sparsify's SparseCoder encodes topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)) and decodes
top_acts @ W_dec + b_dec. Conversions (SAELens's own sparsify loader gets the first three wrong):
  - `encoder.weight` is nn.Linear-shaped [d_sae, d_in] -> W_enc = its transpose; `W_dec` is already [d_sae, d_in];
  - `num_latents: 0` means d_in × expansion_factor;
  - b_dec is always subtracted before encoding -> b_dec_in_encoder = True;
  - architecture topk with cfg `k`; `multi_topk` only changes training, so it is ignored.
Transcoders, skip connections and the groupmax activation are rejected.
sparsify records no hook point in cfg.json; it is read from the folder name the trainer gives it
(`layers.L` -> resid_post, `layers.L.mlp` -> mlp_out, `layers.L.self_attn` -> attn_out), and the model
from the run's `config.json` one folder up (`model`), when present.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import SAEConfig
from ..hookpoints import HookPoint
from ._files import common_dtype, read_json, read_safetensors, require_keys, state_dtype, unsupported

NAME = "sparsify"
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

_FOLDER = re.compile(r"(?:.*\.)?layers\.(\d+)(\.mlp|\.self_attn)?")
_SITES = {None: "resid_post", ".mlp": "mlp_out", ".self_attn": "attn_out"}


def detect(folder: Path) -> bool:
    if not ((folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()):
        return False
    try:
        raw = read_json(folder / CONFIG_FILE)
    except ValueError:
        return False
    return "expansion_factor" in raw or "num_latents" in raw


def read(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    raw = read_json(folder / CONFIG_FILE)
    if raw.get("transcode"):
        raise unsupported(NAME, "transcoders (transcode=true)")
    if raw.get("skip_connection"):
        raise unsupported(NAME, "skip connections (skip_connection=true)")
    if raw.get("activation", "topk") != "topk":
        raise unsupported(NAME, f"activation {raw.get('activation')!r} (only topk)")
    d_in = _int(raw, "d_in")
    d_sae = int(raw.get("num_latents") or 0) or d_in * _int(raw, "expansion_factor")

    sd = read_safetensors(folder / WEIGHTS_FILE)
    require_keys(sd, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), NAME)
    extra = sorted(set(sd) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise unsupported(NAME, f"unexpected tensor(s) {', '.join(extra)}")
    sd = common_dtype(
        {
            "W_enc": sd["encoder.weight"].T,
            "b_enc": sd["encoder.bias"],
            "W_dec": sd["W_dec"],
            "b_dec": sd["b_dec"],
        },
        "W_enc",
    )

    metadata: dict[str, Any] = {"source_format": NAME, "source_cfg": raw}
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="topk",
        hook_point=_hook_point(folder, metadata),
        model=_model(folder),
        k=_int(raw, "k"),
        b_dec_in_encoder=True,
        dtype=state_dtype(sd),
        metadata=metadata,
    )
    return cfg, sd


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"sparsify cfg.json: {key!r} must be a positive int, got {value!r}")
    return value


def _hook_point(folder: Path, metadata: dict[str, Any]) -> str:
    m = _FOLDER.fullmatch(folder.resolve().name)
    if m is None:
        return ""
    metadata["source_hook_name"] = folder.resolve().name
    return str(HookPoint(int(m.group(1)), _SITES[m.group(2)]))


def _model(folder: Path) -> str:
    run_config = folder.resolve().parent / "config.json"
    if not run_config.is_file():
        return ""
    try:
        model = read_json(run_config).get("model")
    except ValueError:
        return ""
    return model if isinstance(model, str) else ""
