"""Llama Scope (OpenMOSS lm_saes) folders: `hyperparams.json` + `checkpoints/final.safetensors`.

Assumptions, from the published hyperparams and the lm_saes `SparseAutoEncoder` that produced them:
  - weights: `encoder.weight [d_sae, d_in]`, `encoder.bias [d_sae]`, `decoder.weight [d_in, d_sae]`
    (nn.Linear), `decoder.bias [d_in]` (absent when `use_decoder_bias` is false -> zeros). Optional
    `log_jumprelu_threshold [d_sae]` (newer lm_saes) takes precedence over the scalar `jump_relu_threshold`;
    `dataset_average_activation_norm.<hook>` scalars in the file stand in for the hyperparams entry.
    Weights file: `checkpoints/final.safetensors`, else the only `*.safetensors` in the folder or `checkpoints/`.
  - `norm_activation: "dataset-wise"`: the SAE sees x * sqrt(d_model) / norm_in and its output is divided by
    the same factor, so input_scale = sqrt(d_model) / `dataset_average_activation_norm.in` (norm_out must
    equal norm_in: one scale each way). "inference" (already folded) or absent -> 1. Per-token/batch norms
    are rejected.
  - b_dec is subtracted before encoding only when `apply_decoder_bias_to_pre_encoder` is true (default false).
  - `act_fn: "jumprelu"`: lm_saes keeps f_i = pre_i where pre_i * s_i > theta, with s_i = |decoder column i|
    when `sparsity_include_decoder_norm` (lm_saes default, assumed true when absent) and 1 otherwise.
    That is our per-latent threshold theta / s_i, computed in the normalised space; a latent with a zero
    decoder column never fires (threshold = dtype max). `act_fn: "relu"` -> relu. TopK checkpoints are rejected
    (lm_saes ranks pre * |decoder column|, which our topk cannot express without rescaling the activations);
    the `top_k` of a jumprelu SAE is a training-time setting and is ignored.
  - hook point from `hook_point_in` (TransformerLens names); hook_point_in != hook_point_out is a transcoder
    and is rejected. Model from `model_name` when present (Llama Scope releases: meta-llama/Llama-3.1-8B).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..config import SAEConfig
from ._files import common_dtype, convert_hook_name, read_json, read_safetensors, require_keys, state_dtype, unsupported

NAME = "llama_scope"
CONFIG_FILE = "hyperparams.json"
WEIGHTS_FILE = Path("checkpoints") / "final.safetensors"
_NORM_KEY = "dataset_average_activation_norm."


def detect(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def read(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    hp = read_json(folder / CONFIG_FILE)
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_in != hook_out:
        raise unsupported(NAME, f"transcoders (hook_point_in {hook_in!r} != hook_point_out {hook_out!r})")
    act_fn = str(hp.get("act_fn", "relu")).lower()
    if act_fn not in ("jumprelu", "relu"):
        raise unsupported(NAME, f"act_fn {act_fn!r} (only jumprelu and relu)")

    raw = read_safetensors(_weights_file(folder))
    norms = {
        k[len(_NORM_KEY) :]: float(v.reshape(-1)[0])
        for k, v in raw.items()
        if k.startswith(_NORM_KEY) and v.numel() == 1
    }
    raw = {k: v for k, v in raw.items() if not k.startswith(_NORM_KEY)}
    require_keys(raw, ("encoder.weight", "encoder.bias", "decoder.weight"), NAME)
    log_threshold = raw.pop("log_jumprelu_threshold", None)
    extra = sorted(set(raw) - {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"})
    if extra:
        raise unsupported(NAME, f"unexpected tensor(s) {', '.join(extra)}")
    if raw["encoder.weight"].dim() != 2:
        raise ValueError(
            f"Llama Scope tensor 'encoder.weight' has shape {tuple(raw['encoder.weight'].shape)}, "
            "expected (d_sae, d_in)"
        )
    W_enc = raw["encoder.weight"].T  # [d_in, d_sae]
    d_in, d_sae = W_enc.shape
    if tuple(raw["decoder.weight"].shape) != (d_in, d_sae):
        raise ValueError(
            f"Llama Scope tensor 'decoder.weight' has shape {tuple(raw['decoder.weight'].shape)}, "
            f"expected {(d_in, d_sae)}"
        )
    W_dec = raw["decoder.weight"].T  # [d_sae, d_in]
    b_dec = raw.get("decoder.bias")
    if b_dec is None or not hp.get("use_decoder_bias", True):
        b_dec = torch.zeros(d_in, dtype=W_dec.dtype)
    sd = {"W_enc": W_enc, "b_enc": raw["encoder.bias"], "W_dec": W_dec, "b_dec": b_dec}

    if act_fn == "jumprelu":
        include_norm = bool(hp.get("sparsity_include_decoder_norm", True))
        dec_norm = W_dec.float().norm(dim=-1) if include_norm else torch.ones(d_sae)  # [d_sae]
        sd["threshold"] = _threshold(hp, log_threshold, dec_norm, W_dec.dtype)
    sd = common_dtype(sd, "W_enc")

    metadata: dict[str, Any] = {"source_format": NAME, "source_act_fn": act_fn}
    cfg = SAEConfig(
        d_in=int(hp.get("d_model", d_in)),
        d_sae=int(hp.get("d_sae", d_sae)),
        architecture=act_fn,
        hook_point=convert_hook_name(hook_in, metadata),
        model=str(hp.get("model_name") or ""),
        b_dec_in_encoder=bool(hp.get("apply_decoder_bias_to_pre_encoder", False)),
        input_scale=_input_scale(hp, norms, hook_in, int(hp.get("d_model", d_in))),
        dtype=state_dtype(sd),
        metadata=metadata,
    )
    return cfg, sd


def _weights_file(folder: Path) -> Path:
    if (folder / WEIGHTS_FILE).is_file():
        return folder / WEIGHTS_FILE
    for where in (folder, folder / "checkpoints"):
        found = sorted(where.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(
                f"Llama Scope folder {folder}: several weight files in {where}, "
                f"expected {WEIGHTS_FILE}: {', '.join(p.name for p in found)}"
            )
    raise ValueError(f"Llama Scope folder {folder} has no {WEIGHTS_FILE} or other *.safetensors file")


def _threshold(
    hp: dict[str, Any], log_threshold: torch.Tensor | None, dec_norm: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    if log_threshold is not None:
        if log_threshold.numel() not in (1, dec_norm.numel()):
            raise ValueError(
                f"Llama Scope tensor 'log_jumprelu_threshold' has shape {tuple(log_threshold.shape)}, "
                f"expected ({dec_norm.numel()},)"
            )
        theta = log_threshold.float().exp().reshape(-1).expand_as(dec_norm)
    elif isinstance(hp.get("jump_relu_threshold"), (int, float)):
        theta = torch.full_like(dec_norm, float(hp["jump_relu_threshold"]))
    else:
        raise ValueError("Llama Scope jumprelu SAE has neither 'jump_relu_threshold' nor 'log_jumprelu_threshold'")
    big = torch.finfo(dtype).max
    return torch.where(dec_norm > 0, theta / dec_norm.clamp(min=1e-30), torch.full_like(theta, big)).clamp(max=big)


def _input_scale(hp: dict[str, Any], file_norms: dict[str, float], hook: Any, d_model: int) -> float:
    mode = hp.get("norm_activation")
    if mode in (None, "inference", "none"):
        return 1.0
    if mode != "dataset-wise":
        raise unsupported(NAME, f"norm_activation {mode!r} (a per-token or per-batch normalisation)")
    norms = hp.get("dataset_average_activation_norm") or {}
    if not isinstance(norms, dict):
        raise ValueError(f"Llama Scope 'dataset_average_activation_norm' must be an object, got {norms!r}")
    norm_in = norms.get("in", file_norms.get(str(hook)))
    norm_out = norms.get("out", norm_in)
    if not isinstance(norm_in, (int, float)) or not norm_in > 0:
        raise ValueError(
            "Llama Scope norm_activation='dataset-wise' needs a positive dataset_average_activation_norm.in"
        )
    if not isinstance(norm_out, (int, float)) or not math.isclose(norm_in, norm_out, rel_tol=1e-6):
        raise unsupported(NAME, f"different input and output norms ({norm_in} vs {norm_out})")
    return math.sqrt(d_model) / float(norm_in)
