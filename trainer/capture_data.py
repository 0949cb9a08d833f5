"""Capture on Ray Data: chunk ids → capture actors (each holds the model, CPU or GPU) → activation shards + rows.

The driver builds the dataset; `CaptureActor` runs inside Ray Data's actor pool. Every chunk is written to the
activation cache (one safetensors shard per chunk and hook point, write-then-rename) before its rows leave the
actor, and an actor serves cached chunks without running the model. So a crashed actor (Ray Data restarts it and
retries its chunk) or a failed job (rerun it) neither loses nor duplicates shards, and a second job on the same
data and hook points only reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainerConfig

FAILURE_MARKER = ".capture_failure_injected"


class CaptureActor:
    """One capture worker: the model at the config's hook points; a batch of chunk ids in, their activations out."""

    def __init__(self, config: dict[str, Any], hook_points: list[str]):
        from .capture import ChunkSource, load_corpus, load_tokenizer

        self.cfg = TrainerConfig.from_dict(config)
        torch.set_num_threads(self.cfg.run.torch_threads)
        device = "cuda" if self.cfg.data.capture_gpus > 0 and torch.cuda.is_available() else "cpu"
        corpus = load_corpus(self.cfg, load_tokenizer(self.cfg.model_path))
        self.source = ChunkSource(self.cfg, corpus, device, hook_points)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks, acts = [], []
        for chunk in batch["chunk"].tolist():
            self._maybe_fail(chunk)
            x = self.source.read(chunk)  # [n_kept, H, d]
            chunks.append(np.full(x.shape[0], chunk, dtype=np.int64))
            acts.append(x.numpy())
        return {"chunk": np.concatenate(chunks), "acts": np.concatenate(acts)}  # [n], [n, H, d]

    def _maybe_fail(self, chunk: int) -> None:
        cache = self.source.cache
        if self.cfg.data.capture_fail_at_chunk != chunk or cache is None:
            return
        marker = cache / FAILURE_MARKER
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(chunk))
        os._exit(1)  # a crash, not an exception: the actor process dies mid-batch


def capture_dataset(cfg: TrainerConfig, chunks: Sequence[int], hook_points: Sequence[str] | None = None):
    """A lazy Ray Dataset of activation rows {"chunk": int64, "acts": [n_hooks, d_model] float32} over `chunks`.

    `data.capture_workers` actors at `data.capture_cpus` CPUs (and `data.capture_gpus` GPUs) each; one chunk per
    task, so a retried task redoes one chunk. Nothing is materialised: rows stream to whoever iterates.
    """
    import ray.data

    points = list(hook_points or cfg.capture_hook_points)
    items = [{"chunk": int(c)} for c in chunks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(
        CaptureActor,
        fn_constructor_kwargs={"config": cfg.to_dict(), "hook_points": points},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.data.capture_workers)),
        num_cpus=cfg.data.capture_cpus,
        num_gpus=cfg.data.capture_gpus or None,
    )


def fill_cache(cfg: TrainerConfig, chunks: Sequence[int] | None = None) -> dict[str, int]:
    """Capture every chunk of `chunks` (default: the training chunks) not yet cached at all hook points, through
    Ray Data; returns counts {chunks, captured, cached, rows}."""
    from .capture import ChunkSource, load_corpus, load_tokenizer

    if not cfg.data.cache_dir:
        raise ValueError("data.capture_workers needs data.cache_dir: the shards are where capture hands over")
    points = cfg.capture_hook_points
    corpus = load_corpus(cfg, load_tokenizer(cfg.model_path))  # tokenised once here, read by every actor
    probe = ChunkSource(cfg, corpus, hook_points=points)
    chunks = corpus.plan.train if chunks is None else chunks
    missing = [c for c in chunks if not all(_exists(probe.chunk_file(c, h)) for h in range(len(points)))]
    rows = 0
    if missing:
        for batch in capture_dataset(cfg, missing, points).iter_batches(batch_size=None, batch_format="numpy"):
            rows += len(batch["chunk"])
    return {"chunks": len(chunks), "captured": len(missing), "cached": len(chunks) - len(missing), "rows": rows}


def _exists(path: Path | None) -> bool:
    return path is not None and path.exists()
