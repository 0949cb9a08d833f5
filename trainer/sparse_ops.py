"""Sparse encoder/decoder kernels for training: cost grows with active latents, not with d_sae, except one matmul.

A TopK-style SAE needs the dense pre-activations once, to choose the winners; everything after that (the values'
gradients into W_enc, b_enc and the input, and the decoder) touches only the chosen (row, latent) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _bag_weight_grad(
    cols: torch.Tensor, offsets: torch.Tensor, g: torch.Tensor, x: torch.Tensor, n: int
) -> torch.Tensor:
    """[n, d_in] with row c = sum over pairs j with cols[j] = c of g[j] * x[row of j].

    That is the weight gradient of an embedding bag, so we borrow its backward kernel: measured on this CPU at
    k=32 it is 6x faster than a dense x.T @ G and 10x faster than index_add over materialised products.
    """
    table = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    with torch.enable_grad():
        out = F.embedding_bag(cols, table, offsets, mode="sum", per_sample_weights=g)
    (grad,) = torch.autograd.grad(out, table, x)
    return grad


class _SelectedPreActs(torch.autograd.Function):
    """values[j] = x[rows[j]] @ W_enc[:, cols[j]] + b_enc[cols[j]], with a backward that never goes dense."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, values, cols, offsets):
        # values [n]: the pre-activations already computed at the pairs; offsets [B] delimit each row's pairs.
        ctx.save_for_backward(x, W_enc, cols, offsets)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # grad [n]
        x, W_enc, cols, offsets = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # Row b's gradient is sum_j grad[j] * W_enc[:, cols[j]] over its pairs: an embedding bag.
            W_t = W_enc.t().contiguous()  # [d_sae, d_in]
            grad_x = F.embedding_bag(cols, W_t, offsets, mode="sum", per_sample_weights=grad)  # [B, d_in]
        if ctx.needs_input_grad[1]:
            grad_W = _bag_weight_grad(cols, offsets, grad, x, W_enc.shape[1]).t().contiguous()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return grad_x, grad_W, grad_b, None, None, None


def selected_pre_acts(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable pre-activations at (rows, cols) [n] plus bag offsets [B] for `sparse_decode`.

    x [B, d_in] (the encoder input, after centring), pre [B, d_sae] computed without grad, rows sorted.
    """
    offsets = torch.searchsorted(rows, torch.arange(x.shape[0], device=rows.device))  # [B]
    values = _SelectedPreActs.apply(x, W_enc, b_enc, pre.detach()[rows, cols], cols, offsets)
    return values, offsets


def sparse_decode(cols: torch.Tensor, offsets: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j acts[j] * W_dec[cols[j]] per row [B, d_in] (no b_dec); rows delimited by offsets."""
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=acts)


def topk_pairs(pre: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) [B*k] of each row's k largest pre-activations (among `allowed` latents), rows ascending."""
    with torch.no_grad():
        scores = pre if allowed is None else pre.masked_fill(~allowed, float("-inf"))
        cols = scores.topk(k, dim=-1, sorted=False).indices  # [B, k]
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, cols.reshape(-1)


def batch_topk_pairs(acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k * B largest positive activations across the whole batch, rows ascending."""
    with torch.no_grad():
        flat = acts.reshape(-1)
        idx = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False).indices
        idx = idx[flat[idx] > 0].sort().values
        d_sae = acts.shape[1]
    return idx // d_sae, idx % d_sae
