"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (as written by `SAE.save_model`).

Tensors are already in our orientation (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold).
Conversions, each exact:
  - architectures standard -> relu, topk -> topk, jumprelu -> jumprelu; a BatchTopK saved for inference is
    already jumprelu; a batchtopk training checkpoint's scalar `topk_threshold` -> per-latent threshold.
  - jumprelu in SAELens is relu(pre) * (pre > t); ours is pre * (pre > t): identical once t is clamped at 0.
  - topk/batchtopk with `rescale_acts_by_decoder_norm` select on pre * |W_dec row| and decode with W_dec/|row|:
    folded as W_enc, b_enc *= |row| and W_dec /= |row|.
  - `apply_b_dec_to_input` -> b_dec_in_encoder.
  - `normalize_activations`: "none" -> input_scale 1; "expected_average_only_in" -> input_scale = the
    `scaling_factor` of `activation_scaler.json` in the folder (SAELens multiplies inputs by it and divides
    outputs by it), error if absent. Run-time norms (layer_norm, constant_norm_rescale, whitening): unsupported.
  - legacy `scaling_factor` tensor (pre-6 "finetuning scaling factor", f * s before W_dec) folded into W_dec.
  - hook point from `metadata.hook_name` (pre-6: top-level `hook_name`/`hook_point`), converted from
    TransformerLens names; model from `metadata.model_name` (pre-6: `model_name`).
Gated, hook_z-reshaped, head-indexed and other SAELens architectures are rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import SAEConfig
from ._files import common_dtype, convert_hook_name, read_json, read_safetensors, require_keys, state_dtype, unsupported

NAME = "saelens"
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"

_ARCHS = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}


def detect(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    raw = read_json(folder / CONFIG_FILE)
    meta_in: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}

    def get(key: str, *legacy: str) -> Any:
        for k in (key, *legacy):
            if meta_in.get(k) is not None:
                return meta_in[k]
            if raw.get(k) is not None:
                return raw[k]
        return None

    source_arch = raw.get("architecture") or "standard"
    k = raw.get("k")
    act_fn = raw.get("activation_fn") or raw.get("activation_fn_str")
    kwargs = raw.get("activation_fn_kwargs") or {}
    if source_arch == "standard" and act_fn == "topk":  # pre-6 configs spelled TopK this way
        source_arch, k = "topk", kwargs.get("k")
    elif source_arch == "standard" and act_fn not in (None, "relu"):
        raise unsupported(NAME, f"activation_fn {act_fn!r} (only relu, topk, jumprelu)")
    if source_arch not in _ARCHS:
        raise unsupported(NAME, f"architecture {source_arch!r}; supported: {', '.join(sorted(_ARCHS))}")
    arch = _ARCHS[source_arch]
    if (raw.get("reshape_activations") or "none") != "none" or get("hook_head_index") is not None:
        raise unsupported(NAME, "per-head (hook_z / hook_head_index) SAEs")

    sd = read_safetensors(folder / WEIGHTS_FILE)
    sd = _fold_legacy_scaling(sd, raw)
    sd = _to_internal(sd, arch)
    if raw.get("rescale_acts_by_decoder_norm"):
        sd = _fold_decoder_norm(sd)
    sd = common_dtype(sd, "W_enc")

    metadata: dict[str, Any] = {"source_format": NAME, "source_architecture": source_arch}
    for key in ("sae_lens_version", "neuronpedia_id", "dataset_path", "context_size", "prepend_bos"):
        if meta_in.get(key) is not None:
            metadata[key] = meta_in[key]
    shape = tuple(sd["W_enc"].shape) + (0, 0)  # [d_in, d_sae] unless the file is corrupt
    cfg = SAEConfig(
        d_in=int(raw.get("d_in") or shape[0]),
        d_sae=int(raw.get("d_sae") or shape[1]),
        architecture=arch,
        hook_point=convert_hook_name(get("hook_name", "hook_point"), metadata),
        model=str(get("model_name") or ""),
        k=_k(k, arch, metadata),
        b_dec_in_encoder=bool(raw.get("apply_b_dec_to_input", True)),
        input_scale=_input_scale(folder, raw.get("normalize_activations")),
        dtype=state_dtype(sd),
        metadata=metadata,
    )
    return cfg, sd


def _k(k: Any, arch: str, metadata: dict[str, Any]) -> int | None:
    if arch not in ("topk", "batchtopk") or k is None:
        return None
    if isinstance(k, (int, float)) and float(k).is_integer() and k > 0:
        return int(k)
    if arch == "topk":
        raise ValueError(f"SAELens topk SAE has invalid k={k!r}")
    metadata["source_k"] = k  # BatchTopK's k is a batch average; inference uses the threshold only
    return None


def _input_scale(folder: Path, mode: Any) -> float:
    if mode in (None, "none", False):
        return 1.0
    if mode not in ("expected_average_only_in", True):
        raise unsupported(NAME, f"normalize_activations={mode!r} (a per-token or whitening normalisation)")
    scaler = folder / SCALER_FILE
    factor = read_json(scaler).get("scaling_factor") if scaler.is_file() else None
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ValueError(
            f"SAELens SAE in {folder} uses normalize_activations='expected_average_only_in' but no scaling factor "
            f"was found ({SCALER_FILE} with a positive 'scaling_factor'); fold it into the weights or add the file"
        )
    return float(factor)


def _fold_legacy_scaling(sd: dict[str, torch.Tensor], raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    scale = sd.pop("scaling_factor", None)
    if scale is None:
        scale = sd.pop("finetuning_scaling_factor", None)
    if scale is not None and not torch.equal(scale, torch.ones_like(scale)):
        if "W_dec" not in sd or scale.shape != sd["W_dec"].shape[:1]:
            raise ValueError(f"SAELens scaling_factor has shape {tuple(scale.shape)}, expected (d_sae,)")
        sd["W_dec"] = sd["W_dec"] * scale.to(sd["W_dec"].dtype)[:, None]
    return sd


def _to_internal(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    if "b_gate" in sd or "r_mag" in sd:
        raise unsupported(NAME, "gated SAEs")
    require_keys(sd, ("W_enc", "b_enc", "W_dec", "b_dec"), NAME)
    out = {k: sd.pop(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch == "jumprelu":
        if "log_threshold" in sd:
            sd["threshold"] = sd.pop("log_threshold").exp()
        if "threshold" in sd:
            out["threshold"] = sd.pop("threshold").clamp(min=0)
    elif arch == "batchtopk" and "topk_threshold" in sd:
        out["threshold"] = sd.pop("topk_threshold").reshape(-1).expand(out["b_enc"].shape[0]).clone()
    if sd:
        raise unsupported(NAME, f"unexpected tensor(s) {', '.join(sorted(sd))} for architecture {arch!r}")
    return out


def _fold_decoder_norm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = sd["W_dec"].float().norm(dim=-1)  # [d_sae]
    sd = dict(sd)
    sd["W_enc"] = (sd["W_enc"].float() * norm).to(sd["W_enc"].dtype)
    sd["b_enc"] = (sd["b_enc"].float() * norm).to(sd["b_enc"].dtype)
    # A batchtopk threshold already applies to the rescaled pre-activation, which is our folded one.
    sd["W_dec"] = (sd["W_dec"].float() / norm[:, None]).to(sd["W_dec"].dtype)
    return sd
