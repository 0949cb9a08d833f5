"""Checks that reject a bad SAE before any replica swaps it in."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import architectures
from .config import SAEConfig
from .hookpoints import HookPoint
from .model import SparseAutoencoder


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if architectures.needs_threshold(cfg.architecture):
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


def check_state_dict(cfg: SAEConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the tensor if a key is missing/extra, a shape is wrong, or a value is not finite."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(state_dict))
    extra = sorted(set(state_dict) - set(shapes))
    if missing:
        raise ValueError(f"SAE weights are missing tensor(s) {', '.join(missing)} (architecture {cfg.architecture!r})")
    if extra:
        raise ValueError(
            f"SAE weights have unexpected tensor(s) {', '.join(extra)} (architecture {cfg.architecture!r})"
        )
    for name, shape in shapes.items():
        t = state_dict[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"SAE tensor {name!r} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"SAE tensor {name!r} has shape {tuple(t.shape)}, expected {shape} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
            )
    check_finite(state_dict)


def check_finite(state_dict: Mapping[str, torch.Tensor]) -> None:
    for name, t in state_dict.items():
        if t is None:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"SAE tensor {name!r} has {bad} non-finite value(s)")


def validate_for_model(sae_cfg: SAEConfig | SparseAutoencoder, d_model: int, n_layers: int) -> None:
    """ValueError unless the SAE fits a model of width d_model with n_layers layers (and its weights are finite)."""
    sae = sae_cfg if isinstance(sae_cfg, SparseAutoencoder) else None
    cfg = sae.cfg if sae is not None else sae_cfg
    if cfg.d_in != d_model:
        raise ValueError(f"SAE d_in={cfg.d_in} does not match the model's d_model={d_model}")
    if not cfg.hook_point:
        raise ValueError("SAE has no hook point; give one (e.g. load_sae(..., hook_point='blocks.15.resid_post'))")
    hp = HookPoint.parse(str(cfg.hook_point))
    if hp.layer >= n_layers:
        raise ValueError(
            f"SAE hook point {cfg.hook_point!r} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
        )
    if sae is not None:
        with torch.no_grad():
            check_finite(dict(sae.state_dict()))
