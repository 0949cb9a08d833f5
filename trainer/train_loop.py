"""The Ray Train per-worker loop: capture → shuffle → SAE step (DDP) → metrics → checkpoint, resumable."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.experimental.tqdm_ray import tqdm

from sae import SparseAutoencoder

from . import collectives
from .buffer import ActivationStream
from .capture import ChunkSource, load_corpus, load_tokenizer
from .config import TrainerConfig
from .metrics import MetricsLog
from .objective import TrainingObjective, normalize_decoder, project_decoder_grad
from .resample import resample_dead_latents
from .sae_init import init_sae
from .schedule import default_lr, lr_factor
from .state import TrainState, load_checkpoint, save_checkpoint
from .stats import RunningStats
from .thresholds import inference_threshold, update_thresholds

INJECTED_FAILURE_MARKER = ".injected_failure"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker; config is TrainerConfig.to_dict() with absolute paths."""
    cfg = TrainerConfig.from_dict(config)
    torch.set_num_threads(cfg.run.torch_threads)
    Worker(cfg).run()


class Worker:
    """One rank's training state and loop."""

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir = Path(cfg.run.storage_path) / cfg.run.name
        corpus = load_corpus(cfg, load_tokenizer(cfg.model_path))
        # All the job's hook points: the first SAE's capture pass fills the cache for the others.
        self.source = ChunkSource(cfg, corpus, self.device, cfg.capture_hook_points)
        self.plan = corpus.plan
        self._setup()

    def _stream(self, position: int, d: int) -> ActivationStream:
        return ActivationStream(
            self.source,
            self.plan,
            d=d,
            batch_size=self.cfg.optim.batch_size,
            capacity=self.cfg.data.shuffle_buffer,
            rank=self.rank,
            world=self.world,
            seed=self.cfg.optim.seed,
            position=position,
        )

    def _setup(self) -> None:
        cfg = self.cfg
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                sae, opt_state, sched_state, state = load_checkpoint(Path(folder))
            state.resumed_from.append(state.step)
            positions = state.stream_positions
            position = positions[self.rank] if len(positions) == self.world else max(positions)
            self.stream = self._stream(position, sae.cfg.d_in)
        else:
            from transformers import AutoConfig

            d = AutoConfig.from_pretrained(str(cfg.model_path)).hidden_size
            self.stream = self._stream(0, d)
            local = RunningStats(d)
            local.update(self.stream.fill())
            init_stats = collectives.merge_stats(local)
            sae = init_sae(cfg, init_stats)
            state = TrainState(
                step=0,
                tokens_since_fired=torch.zeros(sae.cfg.d_sae, dtype=torch.int64),
                stream_positions=[0] * self.world,
                init_stats=init_stats,
                threshold_ema=torch.full((sae.cfg.d_sae,), math.nan),
            )
            opt_state = sched_state = None
        self.sae: SparseAutoencoder = sae
        self.state = state
        objective = TrainingObjective(sae, cfg.optim, cfg.sae.architecture)
        self.model = ray.train.torch.prepare_model(objective, parallel_strategy="ddp" if self.world > 1 else None)
        self.params = [p for p in sae.parameters() if p.requires_grad]
        lr = cfg.optim.lr or default_lr(sae.cfg.d_sae)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=cfg.optim.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.optim))
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
            self.scheduler.load_state_dict(sched_state)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl") if self.rank == 0 else None
        if self.log is not None and state.resumed_from:
            self.log.truncate_after(state.step)

    def run(self) -> None:
        cfg, state = self.cfg, self.state
        bar = tqdm(total=cfg.optim.steps, desc=f"SAE {cfg.run.name}", unit="step") if self.rank == 0 else None
        if bar is not None:
            bar.update(state.step)
        started, base_elapsed = time.perf_counter(), state.elapsed_s
        while state.step < cfg.optim.steps:
            x = self.stream.next_batch().to(self.device)  # [batch, d_in]
            out = self._step(x)
            state.elapsed_s = base_elapsed + time.perf_counter() - started
            record = self._maybe_log(out)
            if bar is not None:
                bar.update(1)
            self._maybe_inject_failure()
            if state.step % cfg.run.checkpoint_every == 0 or state.step == cfg.optim.steps:
                self._checkpoint(record or {"step": state.step})
        if bar is not None:
            bar.close()

    def _step(self, x: torch.Tensor):
        cfg, state, sae = self.cfg, self.state, self.sae
        dead = (state.tokens_since_fired >= cfg.optim.dead_after_tokens).to(self.device)
        l1 = cfg.optim.l1_coef * min(1.0, (state.step + 1) / max(cfg.optim.l1_warmup_steps, 1))
        out = self.model(x, dead, l1)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        project_decoder_grad(sae)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        normalize_decoder(sae)
        state.step += 1
        global_batch = x.shape[0] * self.world
        state.tokens += global_batch
        fired = collectives.all_reduce(out.fired.to(torch.int32), "max").bool().cpu()
        state.tokens_since_fired += global_batch
        state.tokens_since_fired[fired] = 0
        if out.min_kept is not None:
            update_thresholds(state, collectives.all_reduce(out.min_kept, "min").cpu(), cfg.optim.threshold_ema)
        if cfg.sae.architecture == "relu":
            self._maybe_resample(x)
        return out

    def _maybe_resample(self, x: torch.Tensor) -> None:
        o, state = self.cfg.optim, self.state
        if not o.resample_every or state.step % o.resample_every or state.step > o.resample_until * o.steps:
            return
        window = o.resample_every * x.shape[0] * self.world
        dead = state.tokens_since_fired >= window
        batch = collectives.broadcast(x.clone())
        seed = o.seed * 1_000_003 + state.step
        resample_dead_latents(self.sae, self.optimizer, batch, dead.to(self.device), seed=seed)
        state.tokens_since_fired[dead] = 0

    def _maybe_log(self, out) -> dict[str, Any] | None:
        cfg, state = self.cfg, self.state
        if state.step % cfg.run.log_every and state.step != cfg.optim.steps:
            return None
        d_in = self.sae.cfg.d_in
        local = torch.stack([out.fvu, out.l0.float(), out.aux, out.sq_err / (cfg.optim.batch_size * d_in)])
        fvu, l0, aux, mse = collectives.all_reduce(local.double(), "mean").tolist()
        dead = state.tokens_since_fired >= cfg.optim.dead_after_tokens
        record = {
            "step": state.step,
            "tokens": state.tokens,
            "fvu": fvu,
            "mse": mse,
            "l0": l0,
            "dead_frac": float(dead.float().mean()),
            "aux_loss": aux,
            "lr": self.scheduler.get_last_lr()[0],
            "elapsed_s": round(state.elapsed_s, 3),
            "resumed_from": state.resumed_from[-1] if state.resumed_from else None,
        }
        if self.log is not None:
            self.log.append(record)
        return record

    def _maybe_inject_failure(self) -> None:
        if self.rank != 0 or self.cfg.run.fail_at_step != self.state.step:
            return
        marker = self.run_dir / INJECTED_FAILURE_MARKER
        if marker.exists():
            return
        marker.write_text(str(self.state.step))
        raise RuntimeError(f"injected failure after step {self.state.step} (run.fail_at_step)")

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        # Every rank takes part in the gather and the report, as Ray Train v2 requires; only rank 0 writes.
        self.state.stream_positions = collectives.all_gather_int(self.stream.position)
        if self.sae.threshold is not None:
            self.sae.threshold.data.copy_(inference_threshold(self.state, self.cfg.sae.threshold_mode))
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_checkpoint(Path(tmp) / "checkpoint", self.sae, self.optimizer, self.scheduler, self.state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
