"""Per-feature statistics: density, activation size, top-activating token contexts, logit-lens tokens.

Written as `feature_stats.json` (format `sae-serve-feature-stats/1`) beside the SAE:
    {"format", "n_tokens", "window": [before, after],
     "features": [{"id", "density", "mean_activation" (mean over tokens where active), "max_activation",
                   "top_contexts": [{"activation", "tokens": [str, ...], "index": position of the active token}],
                   "logit_lens": {"top": [[token, logit], ...], "bottom": [[token, logit], ...]}}]}
Logit lens: each decoder row (a direction in model space) times the unembedding, with no final norm.
"""

from __future__ import annotations

from typing import Any

import torch

FORMAT = "sae-serve-feature-stats/1"


class FeatureAccumulator:
    """Streams activations f [n, d_sae] (with each row's global token position) into per-feature statistics."""

    def __init__(self, d_sae: int, top_n: int):
        self.top_n = top_n
        self.count = torch.zeros(d_sae, dtype=torch.int64)  # tokens where the feature is active
        self.total = torch.zeros(d_sae, dtype=torch.float64)  # sum of activations
        self.max = torch.zeros(d_sae)
        self.top_vals = torch.full((top_n, d_sae), -1.0)  # [top_n, d_sae]; -1 marks an empty slot
        self.top_pos = torch.full((top_n, d_sae), -1, dtype=torch.int64)
        self.n_tokens = 0

    def update(self, f: torch.Tensor, positions: torch.Tensor) -> None:
        """f [n, d_sae] activations; positions [n] int64 token positions in the flattened evaluation set."""
        active = f > 0
        self.count += active.sum(0)
        self.total += f.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, f.max(0).values)
        self.n_tokens += f.shape[0]
        vals = torch.cat([self.top_vals, f.masked_fill(~active, -1.0)])  # [top_n + n, d_sae]
        pos = torch.cat([self.top_pos, positions[:, None].expand_as(f)])
        best = vals.topk(self.top_n, dim=0)
        self.top_vals = best.values
        self.top_pos = pos.gather(0, best.indices)

    @property
    def density(self) -> torch.Tensor:
        """Fraction of tokens on which each feature is active [d_sae]."""
        return self.count.double() / max(self.n_tokens, 1)


@torch.no_grad()
def logit_lens(W_dec: torch.Tensor, W_U: torch.Tensor, n: int, chunk: int = 512):
    """(top_ids, top_vals, bottom_ids, bottom_vals), each [d_sae, n], of W_dec [d_sae, d] @ W_U.T [d, vocab]."""
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    for s in range(0, W_dec.shape[0], chunk):
        logits = W_dec[s : s + chunk].float() @ W_U.float().t()  # [chunk, vocab]
        top, bottom = logits.topk(n, dim=-1), logits.topk(n, dim=-1, largest=False)
        for acc, t in zip(outs, (top.indices, top.values, bottom.indices, bottom.values)):
            acc.append(t)
    return tuple(torch.cat(acc) for acc in outs)


def density_histogram(density: torch.Tensor, n_tokens: int, bins: int = 30) -> dict[str, Any]:
    """Histogram of log10(density) over features that fired at least once, plus the never-active count."""
    alive = density > 0
    floor = -float(torch.log10(torch.tensor(float(max(n_tokens, 1))))) if n_tokens else -6.0
    edges = torch.linspace(min(floor, -1.0), 0.0, bins + 1)
    counts = torch.histogram(density[alive].log10().float().clamp(edges[0], 0.0), bins=edges).hist
    return {
        "log10_bin_edges": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
        "never_active": int((~alive).sum()),
    }


class TokenText:
    """Token id -> display string, decoded once per distinct id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


def feature_records(
    acc: FeatureAccumulator,
    tokens: torch.Tensor,
    lens: tuple[torch.Tensor, ...],
    text: TokenText,
    window: tuple[int, int],
) -> list[dict[str, Any]]:
    """The `features` list of feature_stats.json; tokens [n_contexts, T] is the evaluation set."""
    T = tokens.shape[1]
    flat = tokens.reshape(-1).tolist()
    top_ids, top_vals, bot_ids, bot_vals = (t.tolist() for t in lens)
    density = acc.density.tolist()
    count, total, mx = acc.count.tolist(), acc.total.tolist(), acc.max.tolist()
    top_vals_t, top_pos_t = acc.top_vals.t().tolist(), acc.top_pos.t().tolist()
    records = []
    for i in range(acc.count.numel()):
        contexts = []
        for v, p in zip(top_vals_t[i], top_pos_t[i]):
            if p < 0 or v <= 0:
                continue
            ctx_start = p - p % T
            lo, hi = max(ctx_start, p - window[0]), min(ctx_start + T, p + window[1] + 1)
            contexts.append({"activation": round(v, 5), "tokens": [text(t) for t in flat[lo:hi]], "index": p - lo})
        records.append(
            {
                "id": i,
                "density": density[i],
                "mean_activation": total[i] / count[i] if count[i] else 0.0,
                "max_activation": mx[i],
                "top_contexts": contexts,
                "logit_lens": {
                    "top": [[text(t), round(v, 4)] for t, v in zip(top_ids[i], top_vals[i])],
                    "bottom": [[text(t), round(v, 4)] for t, v in zip(bot_ids[i], bot_vals[i])],
                },
            }
        )
    return records
