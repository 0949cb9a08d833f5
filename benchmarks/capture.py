"""Trainer capture throughput: Ray Data capture with 2 actors vs 1 (each held to one core), and against vLLM's plain
prefill of the same text, in one run.

The same packed demo-corpus contexts (fortune files, 128 tokens, BOS-led) go through `trainer.capture_data` at the
SAE's hook point (blocks.15.resid_post, float32 math on CPUs without bf16 units) with 1 and with 2 capture actors,
each at 1 CPU and 1 torch thread, no cache, interleaved over repeats, median kept (actor start-up and model load
included: that is what a job pays). Then the project's engine starts (as `benchmarks/engine.py` starts it, and is
shut down on every way out) and prefills the same contexts, all submitted at once, one token generated each, after
a warm-up on other contexts. Tokens/s counts every context position the model ran. The last line is JSON:
{"workers2_vs_1", "tokens_per_s", "vs_engine_prefill", ...}.

    python -m benchmarks.capture [--contexts 256] [--repeats 3] [--no-engine]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import time

from benchmarks import machine
from benchmarks.exits import exit_on_sigterm

HOOK_POINT = "blocks.15.resid_post"
CONTEXT_SIZE = 128


def capture_config(n_contexts: int, workers: int):
    """The demo config cut to about n_contexts contexts, no cache, `workers` capture actors at 1 CPU each."""
    from serve.engine.model_files import resolve_model
    from trainer.config import load_config

    return load_config(
        None,
        [
            f"model={resolve_model('embedded', prepare=False)}",
            f"sae.hook_point={HOOK_POINT}",
            f"data.context_size={CONTEXT_SIZE}",
            "data.contexts_per_chunk=8",
            "data.capture_batch_size=8",
            "data.eval_fraction=0",
            f"data.max_documents={n_contexts * 4}",  # fortunes average ≈ 60 tokens; trimmed to n_contexts below
            "data.cache_dir=null",
            f"data.capture_workers={workers}",
            "data.capture_cpus=1",
            "run.torch_threads=1",
        ],
    )


def contexts(n_contexts: int):
    """Token ids [n, 128] of the first n packed contexts, and their chunk ids."""
    from trainer.capture import load_corpus, load_tokenizer

    cfg = capture_config(n_contexts, 1)
    corpus = load_corpus(cfg, load_tokenizer(cfg.model_path))
    if corpus.contexts.shape[0] < n_contexts:
        raise SystemExit(f"the corpus cut gives {corpus.contexts.shape[0]} contexts, fewer than {n_contexts}")
    chunks = [c for c in range(-(-n_contexts // 8)) if corpus.plan.context_range(c)[0] < n_contexts]
    return corpus.contexts[: len(chunks) * 8], chunks, cfg


def capture_seconds(cfg, chunks: list[int]) -> float:
    from trainer.capture_data import capture_dataset

    t0 = time.perf_counter()
    for _ in capture_dataset(cfg, chunks).iter_batches(batch_size=None, batch_format="numpy"):
        pass
    return time.perf_counter() - t0


def measure_capture(cfg, chunks: list[int], repeats: int) -> dict[int, float]:
    """Median seconds per worker count, on a private local Ray of 2 CPUs."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(repeats):
            for workers in (1, 2):
                run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, capture_workers=workers))
                times[workers].append(capture_seconds(run, chunks))
                print(f"repeat {r} capture workers={workers}: {times[workers][-1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    return {w: statistics.median(t) for w, t in times.items()}


async def prefill_seconds(tokens, warmup) -> float:
    """Seconds for the engine to prefill every context of `tokens` [n, T] (submitted together, 1 token each)."""
    from serve.engine.config import EngineConfig
    from serve.engine.engine import SAEEngine, Sampling

    engine = await SAEEngine.start(EngineConfig())
    try:  # the engine is shut down on every way out (exceptions, Ctrl-C, SIGTERM: see benchmarks/exits.py)
        sampling = Sampling(max_tokens=1, temperature=0.0)

        async def one(ids: list[int]) -> None:
            async for _ in engine.generate(ids, sampling):
                pass

        await asyncio.gather(*[one(row) for row in warmup.tolist()])
        t0 = time.perf_counter()
        await asyncio.gather(*[one(row) for row in tokens.tolist()])
        return time.perf_counter() - t0
    finally:
        engine.shutdown()


def main(args: argparse.Namespace) -> dict:
    tokens, chunks, cfg = contexts(args.contexts)
    n_tokens = tokens.numel()
    med = measure_capture(cfg, chunks, args.repeats)
    result = {
        "workers2_vs_1": round(med[1] / med[2], 3),
        "tokens_per_s": round(n_tokens / med[2], 1),
        "vs_engine_prefill": None,
        "tokens_per_s_1_worker": round(n_tokens / med[1], 1),
        "n_tokens": n_tokens,
    }
    if not args.no_engine:
        # Warm-up text: shifted ids, so no prefix of the timed contexts is cached by the warm-up.
        warmup = (tokens[: max(1, len(tokens) // 4)] + 1) % (int(tokens.max()) + 1)
        engine_s = asyncio.run(prefill_seconds(tokens, warmup))
        result["engine_prefill_tokens_per_s"] = round(n_tokens / engine_s, 1)
        result["vs_engine_prefill"] = round(result["tokens_per_s"] / result["engine_prefill_tokens_per_s"], 3)
    print(
        f"\n{n_tokens} tokens at {HOOK_POINT}, median of {args.repeats}: capture 1 worker "
        f"{result['tokens_per_s_1_worker']} tok/s, 2 workers {result['tokens_per_s']} tok/s; "
        f"engine prefill {result.get('engine_prefill_tokens_per_s')} tok/s"
    )
    return result


if __name__ == "__main__":
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=256, help="128-token contexts captured per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per worker count")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine prefill comparison")
    result = main(parser.parse_args())
    print(f"machine: {machine.describe()}")
    print(json.dumps(result))
