"""Training state and checkpoints: a checkpoint folder is a loadable SAE folder plus `train_state.pt`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae import SparseAutoencoder, load_sae, save_sae

from .stats import RunningStats

STATE_FILE = "train_state.pt"


@dataclass
class TrainState:
    """Everything besides weights and optimiser that a resumed run needs to continue where it stopped."""

    step: int
    """Optimizer steps taken."""
    tokens_since_fired: torch.Tensor
    """Global activations since each latent last fired [d_sae] int64 (dead-latent detection)."""
    stream_positions: list[int]
    """Chunks pulled by each rank's activation stream."""
    init_stats: RunningStats
    """Statistics of the first buffer fill (all ranks), used for b_dec, the input scale and the card."""
    threshold_ema: torch.Tensor
    """batchtopk: per-latent EMA of the smallest kept activation [d_sae] (nan until a latent is kept)."""
    global_threshold: float = math.nan
    """batchtopk: EMA of the batch-wide smallest kept activation."""
    tokens: int = 0
    """Global activations trained on."""
    elapsed_s: float = 0.0
    """Training wall time across attempts."""
    resumed_from: list[int] = field(default_factory=list)
    """Steps this run resumed from, one per restart."""

    def to_dict(self) -> dict[str, Any]:
        """torch.save-able with weights_only loading (tensors, numbers, lists only)."""
        return {
            "step": self.step,
            "tokens_since_fired": self.tokens_since_fired,
            "stream_positions": list(self.stream_positions),
            "init_stats": self.init_stats.to_tensor(),
            "threshold_ema": self.threshold_ema,
            "global_threshold": self.global_threshold,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed_s,
            "resumed_from": list(self.resumed_from),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Inverse of to_dict."""
        data = dict(data)
        data["init_stats"] = RunningStats.from_tensor(data["init_stats"])
        return cls(**data)


def save_checkpoint(
    folder: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState
) -> Path:
    """Write the SAE (native format, so a checkpoint is itself a servable SAE) and the training state."""
    save_sae(sae, folder)
    torch.save(
        {"state": state.to_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        folder / STATE_FILE,
    )
    return folder


def load_checkpoint(folder: Path) -> tuple[SparseAutoencoder, dict[str, Any], dict[str, Any], TrainState]:
    """(trainable SAE, optimizer state dict, scheduler state dict, TrainState) from a checkpoint folder."""
    sae = load_sae(folder)
    sae.train()
    for name, param in sae.named_parameters():
        param.requires_grad_(name != "threshold")
    blob = torch.load(folder / STATE_FILE, weights_only=True)
    return sae, blob["optimizer"], blob["scheduler"], TrainState.from_dict(blob["state"])


def load_state(folder: Path) -> TrainState:
    """The TrainState alone (for evaluation and the card)."""
    return TrainState.from_dict(torch.load(Path(folder) / STATE_FILE, weights_only=True)["state"])
