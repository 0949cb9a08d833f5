"""End-of-training evaluation on held-out text: reconstruction, sparsity, downstream loss, feature statistics.

- FVU = sum ||x - x̂||² / sum ||x - mean(x)||² and L0 over the held-out tokens the SAE was trained to read
  (special tokens and norm outliers excluded as in training).
- Next-token cross-entropy with the model clean, with the SAE's reconstruction spliced in at the hook point,
  and with the hook point zeroed (same positions as the splice); loss recovered = (CE_zero - CE_sae) /
  (CE_zero - CE_clean), 1 being a perfect SAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sae import SparseAutoencoder, hf_module_and_output

from .capture import Corpus, inlier_mask
from .config import DataConfig, EvalConfig
from .feature_stats import FeatureAccumulator, TokenText, density_histogram, feature_records, logit_lens
from .stats import RunningStats


@dataclass
class EvalResult:
    """Summary numbers for the card and the per-feature records for feature_stats.json."""

    metrics: dict[str, Any]
    """Scalar evaluation metrics."""
    histogram: dict[str, Any]
    """log10 feature density histogram."""
    density: torch.Tensor
    """Per-feature density [d_sae]."""
    features: list[dict[str, Any]]
    """Per-feature statistics."""


def held_out_tokens(corpus: Corpus, max_contexts: int) -> torch.Tensor:
    """Up to max_contexts held-out contexts [n, T], in chunk order."""
    parts = [corpus.chunk_tokens(c) for c in corpus.plan.held_out]
    return torch.cat(parts)[:max_contexts]


def _with_output(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder, model: torch.nn.Module, tokenizer, corpus: Corpus, cfg: EvalConfig, data: DataConfig
) -> EvalResult:
    """Run the three passes over held-out contexts and collect metrics and feature statistics."""
    sae = sae.eval()
    tokens = held_out_tokens(corpus, cfg.max_contexts)  # [n_ctx, T]
    module, extract = hf_module_and_output(model, sae.cfg.hook_point)
    acc = FeatureAccumulator(sae.cfg.d_sae, cfg.top_contexts)
    x_stats = RunningStats(sae.cfg.d_in)
    sums = {"sq_err": 0.0, "l0": 0.0, "ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "targets": 0, "outliers": 0}
    T = tokens.shape[1]
    for start in range(0, tokens.shape[0], cfg.batch_size):
        ids = tokens[start : start + cfg.batch_size].long()  # [b, T]
        seen: dict[str, torch.Tensor] = {}
        mode = {"value": "clean"}

        def hook(_m, _a, output):
            x = extract(output)  # [b, T, d]
            if mode["value"] == "clean":
                seen["x"] = x.float()
                return None
            replacement = seen["x_hat"] if mode["value"] == "sae" else torch.zeros_like(x)
            return _with_output(output, torch.where(seen["keep"][..., None], replacement.to(x.dtype), x))

        handle = module.register_forward_hook(hook)
        try:
            losses = {}
            for name in ("clean", "sae", "zero"):
                mode["value"] = name
                logits = model(input_ids=ids, use_cache=False).logits  # [b, T, vocab]
                if name == "clean":
                    x = seen["x"]
                    regular = corpus.keep_mask(ids, data.exclude_special_tokens)  # [b, T]
                    keep = regular.clone()
                    keep[regular] = inlier_mask(x[regular].norm(dim=-1), data.outlier_norm_factor)
                    sums["outliers"] += int(regular.sum() - keep.sum())
                    f = sae.encode(x)  # [b, T, d_sae]
                    seen["x_hat"], seen["keep"] = sae.decode(f), keep
                    _accumulate(sums, acc, x_stats, x, f, seen["x_hat"], keep, start * T)
                losses[name] = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
        finally:
            handle.remove()
        for name, value in losses.items():
            sums[f"ce_{name}"] += float(value)
        sums["targets"] += ids.shape[0] * (T - 1)

    n = max(x_stats.count, 1)
    ce = {k: sums[f"ce_{k}"] / sums["targets"] for k in ("clean", "sae", "zero")}
    gap = ce["zero"] - ce["clean"]
    density = acc.density
    metrics = {
        "n_contexts": int(tokens.shape[0]),
        "n_tokens": int(x_stats.count),
        "outlier_tokens": sums["outliers"],
        "fvu": sums["sq_err"] / (n * x_stats.total_variance),
        "mse": sums["sq_err"] / (n * sae.cfg.d_in),
        "l0": sums["l0"] / n,
        "dead_frac": float((density == 0).double().mean()),
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_delta": ce["sae"] - ce["clean"],
        # None when zeroing the hook point does not hurt (an untrained model): there is no loss to recover.
        "loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap > 0 else None,
    }
    W_U = model.get_output_embeddings().weight  # [vocab, d]
    lens = logit_lens(sae.W_dec, W_U, cfg.logit_lens_tokens)
    features = feature_records(acc, tokens, lens, TokenText(tokenizer), (cfg.window_before, cfg.window_after))
    return EvalResult(metrics, density_histogram(density, x_stats.count), density, features)


def _accumulate(sums, acc, x_stats, x, f, x_hat, keep, offset) -> None:
    """Fold one batch's kept positions into the running sums; offset is the batch's first flat token position."""
    positions = torch.arange(keep.numel()).view_as(keep)[keep] + offset  # [n_kept]
    xk, fk, rk = x[keep], f[keep], x_hat[keep]  # [n_kept, d] / [n_kept, d_sae]
    x_stats.update(xk)
    sums["sq_err"] += float((xk - rk).pow(2).sum())
    sums["l0"] += float((fk > 0).sum())
    acc.update(fk, positions)
