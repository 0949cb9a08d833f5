"""Trainer benchmark: our SAE training step vs EleutherAI sparsify's, on identical activations, in one process.

Both train a TopK SAE of the same width and k on the same activation batches in the same order, with Adam at the
same learning rate and schedule, aux-k (alpha 1/32) and the same dead-latent threshold; the steps alternate, so
a busy neighbour slows both alike. sparsify is driven directly as its Trainer does per update (encode/decode
with its fused encoder, fvu + auxk loss, backward, remove the decoder-parallel gradient, Adam step, re-normalise
the decoder), with SPARSIFY_DISABLE_TRITON=1 (its eager CPU kernels). Throughput counts only the training step;
FVU is measured afterwards on held-out activations. The last line is JSON:
{"throughput_vs_sparsify", "fvu", "fvu_sparsify", ...}.

    python -m benchmarks.trainer [--config trainer/configs/smollm2-l15-resid-8x.yaml] [--steps 150] [--batch 4096]

Activations come from the config's activation cache when the demo job has filled it, else they are captured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    # Run as a script, this file would shadow the `trainer` package it benchmarks.
    sys.path[0] = str(ROOT)


def load_activations(config: Path, n_train: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(train [n_train, d], held-out [n_eval, d]) float32 activations at the config's hook point."""
    from trainer.capture import ChunkSource, load_corpus, load_tokenizer
    from trainer.config import load_config
    from trainer.job import resolve_paths

    cfg = resolve_paths(load_config(config))
    corpus = load_corpus(cfg, load_tokenizer(cfg.model_path))
    source = ChunkSource(cfg, corpus)

    def take(chunks, n: int) -> torch.Tensor:
        parts, have = [], 0
        for chunk in chunks:
            if have >= n:
                break
            parts.append(source(chunk))
            have += parts[-1].shape[0]
        if have < n:
            raise SystemExit(f"the corpus has only {have} activations for a request of {n}")
        return torch.cat(parts)[:n]

    train = take(corpus.plan.train, n_train)
    gen = torch.Generator().manual_seed(0)
    return train[torch.randperm(n_train, generator=gen)], take(corpus.plan.held_out, n_eval), cfg


class Ours:
    """Our training step on a fresh SAE (trainer.objective + projected-gradient Adam + unit-norm decoder)."""

    def __init__(self, cfg, x_init: torch.Tensor, lr: float, schedule):
        from trainer.objective import TrainingObjective
        from trainer.sae_init import init_sae
        from trainer.stats import RunningStats

        stats = RunningStats(x_init.shape[1])
        stats.update(x_init)
        self.sae = init_sae(cfg, stats)
        self.objective = TrainingObjective(self.sae, cfg.optim, "topk")
        params = [p for p in self.sae.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.since_fired = torch.zeros(self.sae.cfg.d_sae, dtype=torch.int64)
        self.dead_after = cfg.optim.dead_after_tokens

    def step(self, x: torch.Tensor) -> float:
        from trainer.objective import normalize_decoder, project_decoder_grad

        out = self.objective(x, self.since_fired >= self.dead_after)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        project_decoder_grad(self.sae)
        self.opt.step()
        self.sched.step()
        normalize_decoder(self.sae)
        self.since_fired += x.shape[0]
        self.since_fired[out.fired] = 0
        return float(out.fvu)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae(x)


class Sparsify:
    """sparsify's SparseCoder and its per-update sequence, as in sparsify.Trainer."""

    def __init__(self, cfg, x_init: torch.Tensor, lr: float, schedule):
        from sparsify import SparseCoder, SparseCoderConfig

        d_in = x_init.shape[1]
        torch.manual_seed(cfg.optim.seed)
        self.sae = SparseCoder(d_in, SparseCoderConfig(expansion_factor=cfg.sae.expansion_factor, k=cfg.sae.k))
        with torch.no_grad():
            self.sae.b_dec.copy_(x_init.mean(0))  # what sparsify.Trainer does on its first batch
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.since_fired = torch.zeros(self.sae.num_latents, dtype=torch.int64)
        self.dead_after = cfg.optim.dead_after_tokens
        self.auxk_alpha = cfg.optim.aux_k_coef

    def step(self, x: torch.Tensor) -> float:
        self.sae.set_decoder_norm_to_unit_norm()
        out = self.sae(x, dead_mask=self.since_fired > self.dead_after)
        (out.fvu + self.auxk_alpha * out.auxk_loss).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        fired = torch.zeros(self.sae.num_latents, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        return float(out.fvu.detach())

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        self.sae.set_decoder_norm_to_unit_norm()
        return self.sae(x).sae_out


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x̂||² / sum ||x - mean(x)||²."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "trainer/configs/smollm2-l15-resid-8x.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--train-acts", type=int, default=262_144)
    parser.add_argument("--eval-acts", type=int, default=16_384)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # before sparsify is imported: no triton on CPU
    torch.set_num_threads(args.threads)

    from trainer.schedule import default_lr, lr_factor

    t0 = time.perf_counter()
    train, held_out, cfg = load_activations(args.config, args.train_acts, args.eval_acts)
    print(
        f"activations: train {tuple(train.shape)}, held-out {tuple(held_out.shape)} "
        f"at {cfg.sae.hook_point} ({time.perf_counter() - t0:.1f}s)"
    )
    cfg.optim.steps, cfg.optim.warmup_steps = args.steps, max(1, args.steps // 20)
    cfg.optim.dead_after_tokens = min(cfg.optim.dead_after_tokens, args.steps * args.batch // 4)
    lr = cfg.optim.lr or default_lr(cfg.sae.expansion_factor * train.shape[1])

    def schedule(step: int) -> float:
        return lr_factor(step, cfg.optim)

    init = train[: min(65_536, train.shape[0])]
    runners = {"ours": Ours(cfg, init, lr, schedule), "sparsify": Sparsify(cfg, init, lr, schedule)}
    seconds = dict.fromkeys(runners, 0.0)
    last_fvu = dict.fromkeys(runners, float("nan"))
    for step in range(args.steps):
        start = step * args.batch % (train.shape[0] - args.batch + 1)
        x = train[start : start + args.batch]
        for name, runner in runners.items():
            t = time.perf_counter()
            last_fvu[name] = runner.step(x)
            if step > 0:  # the first step pays one-off allocation costs
                seconds[name] += time.perf_counter() - t
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train fvu ours {last_fvu['ours']:.4f}  sparsify {last_fvu['sparsify']:.4f}")
    timed = (args.steps - 1) * args.batch
    throughput = {name: timed / s for name, s in seconds.items()}
    held = {name: fvu(held_out, runner.reconstruct(held_out)) for name, runner in runners.items()}
    for name in runners:
        print(f"{name:9s} {throughput[name]:9.0f} activations/s   held-out FVU {held[name]:.4f}")
    print(
        json.dumps(
            {
                "throughput_vs_sparsify": throughput["ours"] / throughput["sparsify"],
                "fvu": held["ours"],
                "fvu_sparsify": held["sparsify"],
                "activations_per_s": throughput["ours"],
                "activations_per_s_sparsify": throughput["sparsify"],
                "steps": args.steps,
                "batch": args.batch,
                "d_sae": runners["ours"].sae.cfg.d_sae,
                "k": cfg.sae.k,
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
