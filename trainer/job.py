"""The job driver: start or join Ray, run the TorchTrainer, then evaluate, write the card and publish."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .config import TrainerConfig


def resolve_paths(cfg: TrainerConfig) -> TrainerConfig:
    """Absolute paths, since Ray workers do not share the driver's working directory."""

    def absolute(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        model=absolute(cfg.model),
        data=dataclasses.replace(
            cfg.data, paths=[absolute(p) for p in cfg.data.paths], cache_dir=absolute(cfg.data.cache_dir)
        ),
        run=dataclasses.replace(cfg.run, storage_path=absolute(cfg.run.storage_path)),
        publish=dataclasses.replace(cfg.publish, registry=absolute(cfg.publish.registry)),
    )


def _init_ray(cfg: TrainerConfig) -> bool:
    """Join RAY_ADDRESS when set, else start a private local Ray bound to 127.0.0.1; True if we started one."""
    if not os.environ.get("RAY_ADDRESS"):
        # On Linux ray.init turns 127.0.0.1 into the machine's address; in its single-machine mode (this switch,
        # read when ray is first imported) every Ray process binds to loopback instead.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        # A submitted job's runtime env is the submitter's to set; workers still cap torch's threads themselves.
        ray.init()
        return False
    env = {"OMP_NUM_THREADS": str(cfg.run.torch_threads), "MKL_NUM_THREADS": str(cfg.run.torch_threads)}
    ray.init(address="local", num_cpus=cfg.run.ray_num_cpus, include_dashboard=False, runtime_env={"env_vars": env})
    return True


def fit(cfg: TrainerConfig):
    """Run the Ray Train job; returns its latest `ray.train.Checkpoint`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .train_loop import train_loop_per_worker

    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run.name} finished without a checkpoint")
    return result.checkpoint


def finalize(cfg: TrainerConfig, checkpoint: Path) -> tuple[Path, dict[str, Any]]:
    """Evaluate the checkpoint's SAE and write `<run>/final/`: SAE, card.json, feature_stats.json, plots, metrics."""
    from sae import load_sae, save_sae

    from .capture import load_corpus, load_language_model
    from .card import build_card
    from .evaluate import evaluate
    from .feature_stats import FORMAT as FEATURES_FORMAT
    from .metrics import read_metrics
    from .plots import plot_density_histogram, plot_training_curves
    from .state import load_state

    torch.set_num_threads(cfg.run.torch_threads)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    final = run_dir / "final"
    sae = load_sae(checkpoint)
    state = load_state(checkpoint)
    save_sae(sae, final)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= state.step]
    shutil.copyfile(run_dir / "metrics.jsonl", final / "metrics.jsonl")
    files: dict[str, Any] = {
        "config": "sae.json",
        "weights": "sae.safetensors",
        "metrics": "metrics.jsonl",
        "plots": [plot_training_curves(records, final / "training_curves.png").name],
    }
    model, tokenizer = load_language_model(cfg.model_path)
    corpus = load_corpus(cfg, tokenizer)
    result = None
    if cfg.eval.enabled:
        result = evaluate(sae, model, tokenizer, corpus, cfg.eval, cfg.data)
        stats = {
            "format": FEATURES_FORMAT,
            "n_tokens": result.metrics["n_tokens"],
            "window": [cfg.eval.window_before, cfg.eval.window_after],
            "features": result.features,
        }
        (final / "feature_stats.json").write_text(json.dumps(stats))
        files["feature_stats"] = "feature_stats.json"
        files["plots"].append(plot_density_histogram(result.histogram, final / "feature_density.png").name)
    sae_id = cfg.publish.sae_id or cfg.run.name
    card = build_card(cfg, sae_id, sae, state, corpus, records[-1] if records else {}, result, files)
    (final / "card.json").write_text(json.dumps(card, indent=2, allow_nan=False))
    return final, card


def run_job(cfg: TrainerConfig) -> dict[str, Any]:
    """Capture, train, evaluate and publish every SAE of the job (`sae` and `more_saes`); returns a summary: the
    first SAE's card metrics and paths at the top, every SAE's under `saes`, capture counts and timings."""
    from .publish import publish

    cfg = resolve_paths(cfg)
    jobs = cfg.sae_jobs()
    started = time.perf_counter()
    owns_ray = _init_ray(cfg)
    capture = None
    try:
        if cfg.data.capture_workers > 0:
            from .capture_data import fill_cache

            capture = {**fill_cache(jobs[0]), "s": round(time.perf_counter() - started, 1)}
        # One Ray Train run per SAE, in order; the first pass cached every hook point, so the others only read.
        checkpoints = [fit(job) for job in jobs]
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    fit_s = time.perf_counter() - started
    saes = []
    for job, checkpoint in zip(jobs, checkpoints):
        with checkpoint.as_directory() as folder:
            final, card = finalize(job, Path(folder))
        entry = publish(final, job.publish.registry, card["sae_id"]) if job.publish.registry else None
        saes.append(
            {
                "sae_id": card["sae_id"],
                "hook_point": card["hook_point"],
                "final": str(final),
                "registry_entry": entry,
                "training": {
                    k: card["training"][k] for k in ("steps", "tokens", "wall_time_s", "dead_frac", "resumed_from")
                },
                "evaluation": card["evaluation"],
            }
        )
    return {
        **saes[0],
        "saes": saes,
        "capture": capture,
        "fit_s": round(fit_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
