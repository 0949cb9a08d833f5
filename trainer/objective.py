"""Training objectives per architecture, computed on the `sae.SparseAutoencoder` parameters in SAE-input space.

All losses are normalised by the batch's total variance (FVU), so their weights do not depend on activation scale:
- topk / batchtopk: FVU + aux_k_coef * aux-k loss (Gao et al. 2024): the dead latents' top-k_aux pre-activations
  reconstruct the live latents' residual, scaled down while few latents are dead;
- relu: FVU + l1_coef * mean_tokens(sum_i f_i) / RMS centred norm (decoder rows stay unit norm, so L1 cannot
  be gamed by shrinking activations and growing the decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sae import SparseAutoencoder

from .config import OptimConfig
from .sparse_ops import batch_topk_pairs, selected_pre_acts, sparse_decode, topk_pairs


@dataclass
class StepOutput:
    """One batch's loss and detached diagnostics."""

    loss: torch.Tensor
    """Scalar to backpropagate."""
    fvu: torch.Tensor
    """Fraction of variance unexplained (scalar)."""
    sq_err: torch.Tensor
    """Sum of squared reconstruction errors in model space (scalar)."""
    l0: torch.Tensor
    """Mean active latents per token (scalar)."""
    aux: torch.Tensor
    """Auxiliary loss (aux-k or L1 term, before its weight)."""
    fired: torch.Tensor
    """Latents active anywhere in the batch [d_sae] bool."""
    min_kept: torch.Tensor | None
    """batchtopk: smallest kept activation per latent [d_sae] (inf where unused)."""


class TrainingObjective(nn.Module):
    """Wraps the SAE so DDP sees one module whose forward returns the loss."""

    def __init__(self, sae: SparseAutoencoder, optim: OptimConfig, architecture: str):
        super().__init__()
        self.sae = sae
        self.architecture = architecture
        self.aux_k = optim.aux_k or sae.cfg.d_in // 2
        self.aux_k_coef = optim.aux_k_coef

    def forward(self, x: torch.Tensor, dead: torch.Tensor, l1_coef: float = 0.0) -> StepOutput:
        """x [B, d_in] in model space; dead [d_sae] bool."""
        sae = self.sae
        scale = sae.cfg.input_scale
        xs = x * scale if scale != 1.0 else x  # [B, d_in] SAE-input space
        xc = xs - sae.b_dec if sae.cfg.b_dec_in_encoder else xs
        total_var = (xs - xs.mean(0)).pow(2).sum()  # scalar
        if self.architecture == "relu":
            return self._relu(xs, xc, total_var, l1_coef)
        return self._sparse(xs, xc, total_var, dead)

    def _sparse(self, xs: torch.Tensor, xc: torch.Tensor, total_var: torch.Tensor, dead: torch.Tensor) -> StepOutput:
        sae = self.sae
        k = sae.cfg.k
        with torch.no_grad():
            pre = xc @ sae.W_enc + sae.b_enc  # [B, d_sae]; the one dense matmul
        if self.architecture == "topk":
            rows, cols = topk_pairs(pre, k)
        else:
            rows, cols = batch_topk_pairs(pre.clamp_min(0), k)
        values, offsets = selected_pre_acts(xc, sae.W_enc, sae.b_enc, pre, rows, cols)
        acts = torch.relu(values)  # [n]
        recon = sparse_decode(cols, offsets, acts, sae.W_dec) + sae.b_dec  # [B, d_in]
        err = xs - recon
        sq = err.pow(2).sum()
        fvu = sq / total_var
        aux = self._aux_k(xc, pre, err, dead, total_var)
        with torch.no_grad():
            live = acts > 0
            fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=xs.device)
            fired[cols[live]] = True
            min_kept = None
            if self.architecture == "batchtopk":
                min_kept = torch.full((sae.cfg.d_sae,), float("inf"), device=xs.device).scatter_reduce(
                    0, cols[live], acts[live].detach(), reduce="amin"
                )
            l0 = live.sum() / xs.shape[0]
        return StepOutput(
            loss=fvu + self.aux_k_coef * aux,
            fvu=fvu.detach(),
            sq_err=sq.detach() / sae.cfg.input_scale**2,
            l0=l0,
            aux=aux.detach(),
            fired=fired,
            min_kept=min_kept,
        )

    def _aux_k(
        self, xc: torch.Tensor, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor, total_var: torch.Tensor
    ) -> torch.Tensor:
        num_dead = int(dead.sum())
        if self.aux_k_coef <= 0 or num_dead == 0:
            return err.new_zeros(())
        k_aux = min(self.aux_k, num_dead)
        rows, cols = topk_pairs(pre, k_aux, allowed=dead[None, :])
        values, offsets = selected_pre_acts(xc, self.sae.W_enc, self.sae.b_enc, pre, rows, cols)
        # No b_dec: the target is the residual, which already has the decoder bias accounted for.
        e_hat = sparse_decode(cols, offsets, torch.relu(values), self.sae.W_dec)  # [B, d_in]
        return min(num_dead / self.aux_k, 1.0) * (e_hat - err.detach()).pow(2).sum() / total_var

    def _relu(self, xs: torch.Tensor, xc: torch.Tensor, total_var: torch.Tensor, l1_coef: float) -> StepOutput:
        sae = self.sae
        f = torch.relu(xc @ sae.W_enc + sae.b_enc)  # [B, d_sae]
        recon = f @ sae.W_dec + sae.b_dec
        sq = (xs - recon).pow(2).sum()
        fvu = sq / total_var
        rms = (total_var / xs.shape[0]).sqrt().detach()
        l1 = f.sum(-1).mean() / rms
        with torch.no_grad():
            active = f > 0
            fired = active.any(0)
            l0 = active.sum() / xs.shape[0]
        return StepOutput(
            loss=fvu + l1_coef * l1,
            fvu=fvu.detach(),
            sq_err=sq.detach() / sae.cfg.input_scale**2,
            l0=l0,
            aux=l1.detach(),
            fired=fired,
            min_kept=None,
        )


@torch.no_grad()
def project_decoder_grad(sae: SparseAutoencoder) -> None:
    """Remove the gradient component parallel to each decoder row: Adam then moves rows along the unit sphere."""
    if sae.W_dec.grad is None:
        return
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1, keepdim=True)  # [d_sae, 1]
    sae.W_dec.grad -= parallel * sae.W_dec


@torch.no_grad()
def normalize_decoder(sae: SparseAutoencoder) -> None:
    """Rescale decoder rows to unit norm (the projection keeps them close; this removes the drift)."""
    sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(sae.W_dec.dtype).eps)
