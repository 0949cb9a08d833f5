"""Dead-latent resampling for ReLU SAEs (Anthropic, "Towards Monosemanticity", simplified to one batch).

Dead latents are pointed at inputs the SAE reconstructs badly (sampled with probability ∝ loss²), the encoder
column gets a fifth of the mean live encoder norm, and Adam's moments for those latents restart from zero.
Every rank runs it on the same (broadcast) batch with the same generator, so the ranks stay identical.
"""

from __future__ import annotations

import torch

from sae import SparseAutoencoder

_ENCODER_NORM_FRACTION = 0.2


@torch.no_grad()
def resample_dead_latents(
    sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor, seed: int
) -> int:
    """Re-initialise latents where dead [d_sae] is True from batch x [B, d_in] (model space); returns the count."""
    idx = dead.nonzero().squeeze(1)  # [n_dead]
    if idx.numel() == 0:
        return 0
    xs = x * sae.cfg.input_scale
    f = torch.relu((xs - sae.b_dec if sae.cfg.b_dec_in_encoder else xs) @ sae.W_enc + sae.b_enc)
    loss = (xs - (f @ sae.W_dec + sae.b_dec)).pow(2).sum(-1)  # [B]
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same draw on every rank and device
    weights = (loss.pow(2) + 1e-12).cpu()
    choice = torch.multinomial(weights, idx.numel(), replacement=idx.numel() > x.shape[0], generator=gen).to(x.device)
    dirs = xs[choice] - sae.b_dec  # [n_dead, d_in]
    dirs /= dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else 1.0
    sae.W_dec[idx] = dirs
    sae.W_enc[:, idx] = dirs.t() * enc_norm * _ENCODER_NORM_FRACTION
    sae.b_enc[idx] = 0.0
    for param, dim in ((sae.W_enc, 1), (sae.W_dec, 0), (sae.b_enc, 0)):
        for moment in optimizer.state.get(param, {}).values():
            if torch.is_tensor(moment) and moment.shape == param.shape:
                moment.index_fill_(dim, idx, 0.0)
    return int(idx.numel())
