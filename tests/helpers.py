"""Tiny builders shared by the test packages."""

from __future__ import annotations

from pathlib import Path

import torch

from sae import SAEConfig, SparseAutoencoder, save_sae


def make_random_sae(
    folder: Path,
    hook_point: str,
    architecture: str = "relu",
    d_in: int = 576,
    d_sae: int = 512,
    k: int | None = None,
    seed: int = 0,
    input_scale: float = 1.0,
) -> SparseAutoencoder:
    """A random SAE whose features fire sparsely on real activations: encoder ≈ decoderᵀ, negative biases."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=architecture,
        hook_point=hook_point,
        model="SmolLM2-135M-Instruct",
        k=k if architecture in ("topk", "batchtopk") else None,
        b_dec_in_encoder=True,
        input_scale=input_scale,
        metadata={"source": "tests.helpers.make_random_sae"},
    )
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        w_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=-1)  # [d_sae, d_in]
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T + 0.02 * torch.randn(d_in, d_sae, generator=g))
        sae.b_enc.copy_(-0.5 * torch.rand(d_sae, generator=g))
        sae.b_dec.copy_(0.05 * torch.randn(d_in, generator=g))
        if getattr(sae, "threshold", None) is not None:
            sae.threshold.copy_(0.5 * torch.rand(d_sae, generator=g))
    save_sae(sae, folder)
    return sae
