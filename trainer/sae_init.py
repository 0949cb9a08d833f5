"""Building a fresh SAE for training: config from the trainer config, weights from a seed and data statistics."""

from __future__ import annotations

import torch

from sae import SAEConfig, SparseAutoencoder

from .config import TrainerConfig
from .stats import RunningStats

# Encoder columns start as the decoder rows times this. Adam's steps have a fixed absolute size, so a smaller
# encoder learns faster relative to its scale: 1/sqrt(3) (the column norm of nn.Linear's default init, sparsify's
# start) reached held-out FVU 0.376 after 100 steps of the demo SAE where 1.0 reached 0.420.
_ENCODER_SCALE = 3**-0.5
# ReLU SAEs start with every latent half-active; a small encoder keeps the initial reconstruction near b_dec.
_RELU_ENCODER_SCALE = 0.1


def sae_config(cfg: TrainerConfig, d_in: int, input_scale: float) -> SAEConfig:
    """The inference-time SAEConfig of the SAE this job trains."""
    arch = cfg.sae.architecture
    return SAEConfig(
        d_in=d_in,
        d_sae=cfg.sae.d_sae or cfg.sae.expansion_factor * d_in,
        architecture=arch,
        hook_point=cfg.sae.hook_point,
        model=cfg.model_path.name,
        k=cfg.sae.k if arch in ("topk", "batchtopk") else None,
        b_dec_in_encoder=cfg.sae.b_dec_in_encoder,
        input_scale=input_scale,
        dtype="float32",
        metadata={"trainer": "sae-serve trainer", "run": cfg.run.name},
    )


@torch.no_grad()
def init_sae(cfg: TrainerConfig, stats: RunningStats) -> SparseAutoencoder:
    """Unit-norm random decoder rows, encoder = scaled decoder transpose, b_dec = data mean (SAE-input space).

    Every rank calls this with the same seed and all-reduced statistics, so all ranks start identical.
    """
    scale = stats.input_scale() if cfg.sae.normalize_input else 1.0
    sae = SparseAutoencoder(sae_config(cfg, stats.d, scale))
    gen = torch.Generator().manual_seed(cfg.optim.seed)
    W_dec = torch.randn(sae.cfg.d_sae, sae.cfg.d_in, generator=gen)  # [d_sae, d_in]
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    sae.W_dec.copy_(W_dec)
    enc_scale = _RELU_ENCODER_SCALE if cfg.sae.architecture == "relu" else _ENCODER_SCALE
    sae.W_enc.copy_(W_dec.t() * enc_scale)
    sae.b_enc.zero_()
    sae.b_dec.copy_((stats.mean * scale).float())
    if sae.threshold is not None:
        sae.threshold.requires_grad_(False)  # estimated from batch statistics, not by gradient
    return sae
