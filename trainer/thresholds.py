"""BatchTopK → JumpReLU: estimate the inference threshold from the smallest activations batch top-k kept."""

from __future__ import annotations

import math

import torch

from .state import TrainState


@torch.no_grad()
def update_thresholds(state: TrainState, min_kept: torch.Tensor, decay: float) -> None:
    """Fold one (all-ranks) batch's per-latent minimum kept activation [d_sae] (inf = not kept) into the EMAs."""
    kept = torch.isfinite(min_kept)
    if not kept.any():
        return
    batch_min = float(min_kept[kept].min())
    g = state.global_threshold
    state.global_threshold = batch_min if math.isnan(g) else decay * g + (1 - decay) * batch_min
    ema = state.threshold_ema
    fresh = kept & torch.isnan(ema)
    ema[fresh] = min_kept[fresh]
    seen = kept & ~fresh
    ema[seen] = decay * ema[seen] + (1 - decay) * min_kept[seen]


def inference_threshold(state: TrainState, mode: str) -> torch.Tensor:
    """Threshold [d_sae] for JumpReLU inference: one global value, or per latent with the global value as fallback."""
    g = 0.0 if math.isnan(state.global_threshold) else state.global_threshold
    if mode == "global":
        return torch.full_like(state.threshold_ema, g)
    return torch.nan_to_num(state.threshold_ema, nan=g)
