"""Steering vectors from contrastive activations, their scores, and the SAE features that make up a direction.

Pure torch. Inputs are activations already reduced per example (the last token's row or the mean over tokens) at
one hook point: `pos[n, d]` and `neg[n, d]`, row i of each forming pair i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:  # [n, d], [m, d] -> [d]
    """Mean of the positive examples minus mean of the negative ones (contrastive activation addition)."""
    return pos.float().mean(dim=0) - neg.float().mean(dim=0)


def pca(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:  # [n, d], [n, d] -> [d]
    """Unit first principal component of the pair differences pos[i] − neg[i] (centred), signed so that the mean
    difference projects positively on it (the positive side is where the vector points)."""
    diffs = pos.float() - neg.float()  # [n, d]
    centred = diffs - diffs.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    direction = vh[0]  # [d], unit
    if torch.dot(direction, diffs.mean(dim=0)) < 0:
        direction = -direction
    return direction


@dataclass(frozen=True)
class Separation:
    """How well a direction separates held-out pairs: the mean projection gap (pos − neg, on the unit direction)
    and the fraction of pairs whose positive example projects above its negative one (sign test)."""

    projection_gap: float
    accuracy: float
    pairs: int


def separation(vector: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Separation:  # [d], [n, d], [n, d]
    unit = vector.float() / vector.float().norm().clamp_min(torch.finfo(torch.float32).tiny)
    gap = (pos.float() - neg.float()) @ unit  # [n]
    return Separation(float(gap.mean()), float((gap > 0).float().mean()), int(gap.numel()))


def decoder_cosine(vector: torch.Tensor, w_dec: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` SAE features whose decoder rows `w_dec[d_sae, d]` have the largest cosine with `vector[d]`:
    (indices [top], cosines [top]), largest first."""
    tiny = torch.finfo(torch.float32).tiny
    rows = w_dec.float() / w_dec.float().norm(dim=1, keepdim=True).clamp_min(tiny)
    cos = rows @ (vector.float() / vector.float().norm().clamp_min(tiny))  # [d_sae]
    values, indices = cos.topk(min(top, cos.numel()))
    return indices, values


@dataclass(frozen=True)
class Contrast:
    """Per feature, between set A and set B of per-text mean activations: mean_a − mean_b, the effect size (that
    difference over the pooled standard deviation, Cohen's d; 0 where both sets are constant) and the difference
    of firing frequency (fraction of texts where the feature is > 0)."""

    features: torch.Tensor  # [k] long, ranked by |effect size|
    mean_diff: torch.Tensor  # [k]
    effect_size: torch.Tensor  # [k]
    frequency_diff: torch.Tensor  # [k]


def contrast(a: torch.Tensor, b: torch.Tensor, top: int) -> Contrast:  # [n_a, d_sae], [n_b, d_sae]
    """Features ranked by |Cohen's d| of their per-text activation between the two sets (each set ≥ 2 texts)."""
    a, b = a.float(), b.float()
    diff = a.mean(dim=0) - b.mean(dim=0)
    n_a, n_b = a.shape[0], b.shape[0]
    pooled = ((n_a - 1) * a.var(dim=0) + (n_b - 1) * b.var(dim=0)) / (n_a + n_b - 2)
    sd = pooled.sqrt()
    effect = torch.where(sd > 0, diff / sd.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(diff))
    freq = (a > 0).float().mean(dim=0) - (b > 0).float().mean(dim=0)
    order = effect.abs().argsort(descending=True, stable=True)[: min(top, effect.numel())]
    return Contrast(order, diff[order], effect[order], freq[order])
