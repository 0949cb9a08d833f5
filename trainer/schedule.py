"""Learning rate: sparsify's width-scaled default and a warm-up / constant / linear-decay schedule."""

from __future__ import annotations

import math

from .config import OptimConfig


def default_lr(d_sae: int) -> float:
    """sparsify's Adam learning rate for a width, tuned for long runs: 2e-4 / sqrt(d_sae / 2**14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Multiplier of the base rate: linear warm-up, constant, then linear decay to zero from decay_start."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    decay_from = int(optim.decay_start * optim.steps)
    if step >= decay_from and optim.steps > decay_from:
        return max(0.0, (optim.steps - step) / (optim.steps - decay_from))
    return 1.0
