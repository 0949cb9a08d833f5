"""Steering and capture cost on the real engine, side by side in one run.

32 concurrent greedy requests × 128 new tokens, each with its own steering spec (add / clamp / h_bias on an 8x TopK
SAE at blocks.15.resid_post — the worst case: clamp and h_bias on TopK need a full encode), against the same requests
unsteered; conditions are interleaved over repeats and the median kept. Then per-token capture of a 128-token prompt
against a plain prefill of it. The last line is JSON.

    python -m benchmarks.engine [--eager] [--repeats 5] [--sae DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.exits import exit_on_sigterm
from serve.engine.config import EngineConfig
from serve.engine.engine import SAEEngine, Sampling
from serve.specs import CaptureSpec, SteeringEntry

N_REQUESTS = 32
NEW_TOKENS = 128
PROMPTS = [f"Story {i}: write a long tale about a traveller who visits city number {i}." for i in range(N_REQUESTS)]


def _random_sae(folder: Path) -> Path:
    from tests.helpers import make_random_sae

    make_random_sae(folder, "blocks.15.resid_post", "topk", d_sae=4608, k=32)
    return folder


async def _throughput(engine: SAEEngine, specs: list[list[SteeringEntry]]) -> float:
    sampling = Sampling(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    async def one(prompt, spec) -> int:
        n = 0
        async for u in engine.generate(prompt, sampling, spec):
            n += sum(len(o.token_ids) for o in u.outputs)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*[one(p, s) for p, s in zip(PROMPTS, specs)])
    return sum(counts) / (time.perf_counter() - t0)


async def _prefill_seconds(engine: SAEEngine, sae_id: str, repeats: int) -> tuple[float, float]:
    """Median seconds of a 128-token prefill, plain and with capture, alternated so load drifts hit both alike."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for capture in (False, True):
            # A fresh prefix each time, so the plain run never reads cached KV (capture never does).
            prompt = [1000 + 2 * i + capture] + [(7 * j + i) % 40000 + 100 for j in range(127)]
            t0 = time.perf_counter()
            if capture:
                await engine.activations(prompt, CaptureSpec(saes=[sae_id], top_k=32))
            else:
                async for _ in engine.generate(prompt, Sampling(max_tokens=1, temperature=0.0)):
                    pass
            times[capture].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True])


async def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = Path(args.sae) if args.sae else _random_sae(Path(tmp) / "bench-topk-8x")
        t0 = time.perf_counter()
        engine = await SAEEngine.start(EngineConfig(enforce_eager=args.eager, saes={"bench": str(sae_dir)}))
        try:  # the engine is shut down on every way out (exceptions, Ctrl-C, SIGTERM: see benchmarks/exits.py)
            startup = time.perf_counter() - t0
            d_sae = engine.saes()[0].d_sae
            features = [(97 * i) % d_sae for i in range(N_REQUESTS)]
            conditions = {
                "unsteered": [[] for _ in features],
                "add": [[SteeringEntry(sae="bench", feature=f, value=4.0)] for f in features],
                "clamp": [[SteeringEntry(sae="bench", feature=f, value=4.0, op="clamp")] for f in features],
                "h_bias": [[SteeringEntry(sae="bench", feature=f, value=4.0, op="h_bias")] for f in features],
            }
            await _throughput(engine, conditions["unsteered"])  # warm-up
            tps: dict[str, list[float]] = {k: [] for k in conditions}
            for r in range(args.repeats):
                for name, specs in conditions.items():
                    tps[name].append(await _throughput(engine, specs))
                    print(f"repeat {r} {name:9s} {tps[name][-1]:7.1f} tok/s", flush=True)
            med = {k: statistics.median(v) for k, v in tps.items()}
            plain, captured = await _prefill_seconds(engine, "bench", args.prefill_repeats)
        finally:
            engine.shutdown()
    mode = "eager" if args.eager else "compiled"
    print(
        f"\nmode {mode}, start-up {startup:.1f} s, {N_REQUESTS} requests x {NEW_TOKENS} tokens, "
        f"median of {args.repeats}"
    )
    for name in conditions:
        print(f"{name:9s} {med[name]:7.1f} tok/s  ratio {med[name] / med['unsteered']:.3f}")
    print(f"prefill 128 tokens: plain {plain * 1000:.1f} ms, with capture {captured * 1000:.1f} ms")
    return {
        "add_ratio": round(med["add"] / med["unsteered"], 3),
        "clamp_ratio": round(med["clamp"] / med["unsteered"], 3),
        "h_bias_ratio": round(med["h_bias"] / med["unsteered"], 3),
        "capture_vs_prefill": round(captured / plain, 3),
        "mode": mode,
    }


if __name__ == "__main__":
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per condition")
    parser.add_argument("--prefill-repeats", type=int, default=20, help="timed prefills per side")
    parser.add_argument("--sae", help="SAE folder to steer with (default: a random 8x TopK at blocks.15.resid_post)")
    result = asyncio.run(main(parser.parse_args()))
    print(f"machine: {machine.describe()}")  # which vector extensions the figures above were measured with
    print(json.dumps(result))
