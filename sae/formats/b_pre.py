"""`b_pre` TopK SAEs (OpenAI-style, as in the Llama 3 TopK pipeline of the seed material):
    h = TopK(W_enc (x - b_pre) + b_enc),   x_hat = W_dec h + b_pre.

Layout assumed (no published reference format exists; names follow the seed's description and PyTorch defaults):
  - one JSON config in the folder (`config.json`, `cfg.json`, `sae_config.json`, or the only `*.json`) with
    `k` (or `top_k`) and optionally sizes `d_model`/`d_in`/`n_inputs` and `n_latents`/`d_sae`/`num_latents`
    (checked against the tensors), `hook_point` (ours or TransformerLens), `model`/`model_name`;
  - one `*.safetensors` file (`model.safetensors`/`sae.safetensors` preferred) holding `b_pre` (alias
    `pre_bias`) [d_in]; the encoder as `encoder.weight` [d_sae, d_in] (nn.Linear) or `W_enc` (either
    orientation; [d_in, d_sae] when square); encoder biases `b_enc`, `latent_bias` and/or `encoder.bias`
    (summed: an nn.Linear bias adds to b_enc); the decoder as `decoder.weight` [d_in, d_sae] (nn.Linear) or
    `W_dec` (either orientation; [d_sae, d_in] when square); a `decoder.bias`, if any, must be zero since
    b_pre is the only output bias.
  - `h_bias` [d_sae] is the seed's post-training steering knob, not part of the trained SAE: zero (or absent)
    is accepted, non-zero is rejected (steer with an h_bias spec instead).
  - inputs are raw activations: a per-token input normalisation (OpenAI's LN preprocessing) is not
    representable and configs declaring one (`normalize`/`normalize_inputs`/`input_normalization`) are rejected;
    a constant `input_scale` in the config is honoured.
Converted to b_dec = b_pre, b_dec_in_encoder = True, architecture topk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import SAEConfig
from ._files import (
    common_dtype,
    convert_hook_name,
    read_json,
    read_safetensors,
    safetensors_keys,
    state_dtype,
    unsupported,
)

NAME = "b_pre"
_CONFIG_NAMES = ("config.json", "cfg.json", "sae_config.json")
_WEIGHT_NAMES = ("model.safetensors", "sae.safetensors")
_PRE_BIAS = ("b_pre", "pre_bias")
_KNOWN = {
    "b_pre",
    "pre_bias",
    "encoder.weight",
    "W_enc",
    "b_enc",
    "latent_bias",
    "encoder.bias",
    "decoder.weight",
    "W_dec",
    "decoder.bias",
    "h_bias",
}


def detect(folder: Path) -> bool:
    weights = _weights_file(folder)
    keys = safetensors_keys(weights) if weights is not None else None
    return keys is not None and any(k in keys for k in _PRE_BIAS) and _config_file(folder) is not None


def read(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    config_path, weights = _config_file(folder), _weights_file(folder)
    if config_path is None or weights is None:
        raise ValueError(f"b_pre SAE folder {folder} needs one JSON config and one *.safetensors file")
    raw = read_json(config_path)
    if any(raw.get(key) for key in ("normalize", "normalize_inputs", "input_normalization")):
        raise unsupported(NAME, "per-token input normalisation")
    sd = read_safetensors(weights)
    extra = sorted(set(sd) - _KNOWN)
    if extra:
        raise unsupported(NAME, f"unexpected tensor(s) {', '.join(extra)}")

    b_pre = _first(sd, _PRE_BIAS, "b_pre")  # [d_in]
    d_in = b_pre.shape[0]
    W_enc = _encoder(sd, d_in)  # [d_in, d_sae]
    d_sae = W_enc.shape[1]
    b_enc = torch.zeros(d_sae, dtype=torch.float32)
    for name in ("b_enc", "latent_bias", "encoder.bias"):
        if name in sd:
            _check(name, sd[name], (d_sae,))
            b_enc = b_enc + sd[name].float()
    W_dec = _decoder(sd, d_in, d_sae)  # [d_sae, d_in]
    for name in ("decoder.bias", "h_bias"):
        if name in sd and bool(sd[name].ne(0).any()):
            raise unsupported(
                NAME,
                f"non-zero {name!r}"
                + (
                    " (a steering setting; zero it before publishing)"
                    if name == "h_bias"
                    else " (b_pre is the output bias)"
                ),
            )
    state = common_dtype({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_pre}, "W_enc")

    k = raw.get("k", raw.get("top_k"))
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{config_path}: 'k' must be an int, got {k!r}")
    for keys, actual in ((("d_model", "d_in", "n_inputs"), d_in), (("n_latents", "d_sae", "num_latents"), d_sae)):
        for key in keys:
            if key in raw and raw[key] != actual:
                raise ValueError(f"{config_path}: {key}={raw[key]!r} but the weights have {actual}")
    metadata: dict[str, Any] = {"source_format": NAME, "source_cfg": raw}
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="topk",
        hook_point=convert_hook_name(raw.get("hook_point"), metadata),
        model=str(raw.get("model") or raw.get("model_name") or ""),
        k=k,
        b_dec_in_encoder=True,
        input_scale=float(raw.get("input_scale", 1.0)),
        dtype=state_dtype(state),
        metadata=metadata,
    )
    return cfg, state


def _config_file(folder: Path) -> Path | None:
    for name in _CONFIG_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.json"))
    return found[0] if len(found) == 1 else None


def _weights_file(folder: Path) -> Path | None:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    return found[0] if len(found) == 1 else None


def _first(sd: dict[str, torch.Tensor], names: tuple[str, ...], what: str) -> torch.Tensor:
    present = [n for n in names if n in sd]
    if len(present) != 1:
        raise ValueError(f"b_pre SAE needs exactly one of {', '.join(names)} for {what}; found {present or 'none'}")
    t = sd[present[0]]
    if t.dim() != 1:
        raise ValueError(f"b_pre SAE tensor {present[0]!r} has shape {tuple(t.shape)}, expected (d_in,)")
    return t


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"b_pre SAE tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")


def _encoder(sd: dict[str, torch.Tensor], d_in: int) -> torch.Tensor:
    if ("encoder.weight" in sd) == ("W_enc" in sd):
        raise ValueError("b_pre SAE needs exactly one of 'encoder.weight', 'W_enc'")
    if "encoder.weight" in sd:
        t = sd["encoder.weight"]  # nn.Linear: [d_sae, d_in]
        if t.dim() != 2 or t.shape[1] != d_in:
            raise ValueError(f"b_pre SAE tensor 'encoder.weight' has shape {tuple(t.shape)}, expected (d_sae, {d_in})")
        return t.T
    t = sd["W_enc"]
    if t.dim() == 2 and t.shape[0] == d_in:
        return t
    if t.dim() == 2 and t.shape[1] == d_in:
        return t.T
    raise ValueError(f"b_pre SAE tensor 'W_enc' has shape {tuple(t.shape)}; neither dimension is d_in={d_in}")


def _decoder(sd: dict[str, torch.Tensor], d_in: int, d_sae: int) -> torch.Tensor:
    if ("decoder.weight" in sd) == ("W_dec" in sd):
        raise ValueError("b_pre SAE needs exactly one of 'decoder.weight', 'W_dec'")
    if "decoder.weight" in sd:
        _check("decoder.weight", sd["decoder.weight"], (d_in, d_sae))  # nn.Linear: [d_in, d_sae]
        return sd["decoder.weight"].T
    t = sd["W_dec"]
    if tuple(t.shape) == (d_sae, d_in):
        return t
    if tuple(t.shape) == (d_in, d_sae):
        return t.T
    raise ValueError(f"b_pre SAE tensor 'W_dec' has shape {tuple(t.shape)}, expected ({d_sae}, {d_in})")
