"""Live features and conditional steering on the real engine, side by side in one run.

32 concurrent greedy streams × 128 new tokens (compiled mode): plain, with live features (top 8 at one SAE, rows
drained while the streams run), steered by one `add` entry each, and steered by the same entries with a `when`
condition at the same SAE (its bound low enough that the condition holds on most tokens). Conditions are interleaved
over repeats and the median kept. Throughput is generated tokens per second over all streams; time to first token
is the median over the streams of the wait for their first update. The last line is JSON.

    python -m benchmarks.live_features [--eager] [--repeats 5] [--requests 32] [--tokens 128]
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
from serve.specs import CaptureSpec, SteeringCondition, SteeringEntry

SAE_ID = "bench"
LIVE = CaptureSpec(saes=[SAE_ID], top_k=8, include_generated=True, include_prompt=False)


def _random_sae(folder: Path) -> Path:
    from tests.helpers import make_random_sae

    make_random_sae(folder, "blocks.15.resid_post", "relu", d_sae=4608)
    return folder


async def _run(engine: SAEEngine, prompts: list[str], specs: list, live: bool, tokens: int) -> tuple[float, float]:
    """(generated tokens per second over all streams, median seconds to a stream's first update)."""
    sampling = Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(prompt: str, spec: list[SteeringEntry]) -> tuple[int, float]:
        n, first, t0 = 0, 0.0, time.perf_counter()
        capture = LIVE if live else None
        async for u in engine.generate(prompt, sampling, spec, capture, live=live):
            if not first and u.outputs:
                first = time.perf_counter() - t0
            n += sum(len(o.token_ids) for o in u.outputs)
        return n, first

    t0 = time.perf_counter()
    results = await asyncio.gather(*[one(p, s) for p, s in zip(prompts, specs)])
    elapsed = time.perf_counter() - t0
    return sum(n for n, _ in results) / elapsed, statistics.median(f for _, f in results)


async def main(args: argparse.Namespace) -> dict:
    prompts = [
        f"User {i}: tell me a long story about a traveller who visits city number {i}.\nAssistant:"
        for i in range(args.requests)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = _random_sae(Path(tmp) / "bench-relu")
        engine = await SAEEngine.start(EngineConfig(enforce_eager=args.eager, saes={SAE_ID: str(sae_dir)}))
        try:  # the engine is shut down on every way out (exceptions, Ctrl-C, SIGTERM: see benchmarks/exits.py)
            d_sae = engine.saes()[0].d_sae
            features = [(97 * i) % d_sae for i in range(args.requests)]
            plain = [[] for _ in features]
            steered = [[SteeringEntry(sae=SAE_ID, feature=f, value=4.0)] for f in features]
            conditional = [  # a ReLU latent is ≥ 0, so "above -1" holds everywhere: the cost of evaluating it
                [
                    SteeringEntry(
                        sae=SAE_ID,
                        feature=f,
                        value=4.0,
                        when=[SteeringCondition(sae=SAE_ID, feature=(f + 1) % d_sae, above=-1.0)],
                    )
                ]
                for f in features
            ]
            conditions = {
                "plain": (plain, False),
                "live": (plain, True),
                "steered": (steered, False),
                "conditional": (conditional, False),
            }
            await _run(engine, prompts, plain, True, args.tokens)  # warm-up (compiles the batch sizes)
            tps: dict[str, list[float]] = {k: [] for k in conditions}
            ttft: dict[str, list[float]] = {k: [] for k in conditions}
            for r in range(args.repeats):
                for name, (specs, live) in conditions.items():
                    rate, first = await _run(engine, prompts, specs, live, args.tokens)
                    tps[name].append(rate)
                    ttft[name].append(first)
                    print(f"repeat {r} {name:11s} {rate:7.1f} tok/s  first token {first * 1000:7.1f} ms", flush=True)
        finally:
            engine.shutdown()
    med = {k: statistics.median(v) for k, v in tps.items()}
    first = {k: statistics.median(v) for k, v in ttft.items()}
    mode = "eager" if args.eager else "compiled"
    print(f"\nmode {mode}, {args.requests} streams x {args.tokens} tokens, median of {args.repeats}")
    for name in conditions:
        print(f"{name:11s} {med[name]:7.1f} tok/s  first token {first[name] * 1000:7.1f} ms")
    return {
        "live_features_ratio": round(med["live"] / med["plain"], 3),
        "ttft_ratio": round(first["live"] / first["plain"], 3),
        "conditional_ratio": round(med["conditional"] / med["steered"], 3),
        "mode": mode,
    }


if __name__ == "__main__":
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per condition")
    parser.add_argument("--requests", type=int, default=32, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    result = asyncio.run(main(parser.parse_args()))
    print(f"machine: {machine.describe()}")  # which vector extensions the figures above were measured with
    print(json.dumps(result))
