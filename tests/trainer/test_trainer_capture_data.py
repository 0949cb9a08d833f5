"""Capture on Ray Data with two capture actors on the embedded model, on a real local Ray: the rows equal the
single-process capture, and a capture actor that dies mid-job loses and duplicates no shard."""

from __future__ import annotations

import os

import pytest
import torch

from trainer.capture import ChunkSource, load_corpus, load_tokenizer
from trainer.capture_data import FAILURE_MARKER, capture_dataset, fill_cache

HOOKS = ["blocks.1.resid_post", "blocks.4.resid_post"]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():  # the test session's cluster (the service's): share it, and leave it running
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture
def capture_config(tiny_config, tmp_path):
    from serve.engine.model_files import resolve_model

    def make(cache: str, *overrides: str):
        return tiny_config(
            f"model={resolve_model('embedded', prepare=False)}",
            f"data.cache_dir={tmp_path / cache}",
            "data.cache_dtype=float32",
            "data.max_documents=40",
            "data.contexts_per_chunk=4",
            "data.capture_batch_size=4",
            f"sae.hook_point={HOOKS[0]}",
            f"data.hook_points=[{HOOKS[1]}]",
            "data.capture_workers=2",
            "data.capture_cpus=0.5",
            *overrides,
        )

    return make


def reference(cfg) -> dict[int, torch.Tensor]:
    """The single-process capture of every training chunk, no cache: {chunk: [n_kept, 2, d]}."""
    import dataclasses

    plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=None))
    corpus = load_corpus(plain, load_tokenizer(cfg.model_path))
    source = ChunkSource(plain, corpus, hook_points=HOOKS)
    return {c: source.read(c) for c in corpus.plan.train}


def shards(cfg) -> list[str]:
    corpus = load_corpus(cfg, load_tokenizer(cfg.model_path))
    source = ChunkSource(cfg, corpus, hook_points=HOOKS)
    return sorted(str(p.relative_to(p.parents[1])) for cache in source.caches for p in cache.glob("*chunk_*"))


def test_two_capture_actors_equal_the_single_process_capture(local_ray, capture_config):
    cfg = capture_config("cache")
    assert cfg.capture_hook_points == HOOKS
    want = reference(cfg)
    rows: dict[int, list[torch.Tensor]] = {}
    for batch in capture_dataset(cfg, list(want)).iter_torch_batches(batch_size=None):
        for chunk in batch["chunk"].unique().tolist():
            rows.setdefault(chunk, []).append(batch["acts"][batch["chunk"] == chunk])
    assert sorted(rows) == sorted(want)
    for chunk, parts in rows.items():
        assert len(parts) == 1  # each chunk came out of one task, once
        torch.testing.assert_close(parts[0], want[chunk])
    assert len(shards(cfg)) == 2 * len(want)  # one shard per chunk and hook point


def test_a_capture_actor_killed_mid_job_loses_and_duplicates_no_shard(local_ray, capture_config):
    cfg = capture_config("cache-crash")
    want = reference(cfg)
    chunks = list(want)
    crash = capture_config("cache-crash", f"data.capture_fail_at_chunk={chunks[len(chunks) // 2]}")
    counts = fill_cache(crash, chunks)
    source = ChunkSource(cfg, load_corpus(cfg, load_tokenizer(cfg.model_path)), hook_points=HOOKS)
    assert (source.cache / FAILURE_MARKER).read_text() == str(chunks[len(chunks) // 2])  # an actor did die
    assert counts["captured"] == len(chunks)
    assert counts["rows"] == sum(x.shape[0] for x in want.values())  # the retried chunk's rows came out once
    names = shards(cfg)
    assert len(names) == len(set(names)) == 2 * len(chunks) and not [n for n in names if n.endswith(".tmp")]
    for chunk, x in want.items():
        torch.testing.assert_close(source.read(chunk), x)
    assert source.captured == 0  # read back from the shards
    again = fill_cache(cfg, chunks)  # a rerun (resume) of the job computes nothing
    assert again == {"chunks": len(chunks), "captured": 0, "cached": len(chunks), "rows": 0}
