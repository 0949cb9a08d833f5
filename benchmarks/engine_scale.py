"""The engine at scale, side by side in one run on the embedded model (compiled), medians of interleaved repeats.

- distinct128: 128 concurrent requests, each with its own spec (add on a distinct feature of the layer-15 SAE),
  against the same requests unsteered (target >= 0.95);
- all_layers: the same requests with `add` at all 30 layers at once, one SAE per layer (target >= 0.90);
- sae_bytes: resident SAE bytes over the bytes of their weights in the serving dtype (target <= 1.05);
- paged: 30 SAEs under a budget that holds 10, every request steering one of them (a mixed load over all 30),
  against the same load on an engine with all 30 resident; failed requests are counted.
The last line is JSON.

    python -m benchmarks.engine_scale [--repeats 3] [--tokens 32]
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
from serve.specs import SteeringEntry

N_REQUESTS = 128
LAYERS = 30
D_SAE = 4608  # 8x of d_model 576
RESIDENT_OF_30 = 10
PROMPTS = [f"Note {i}: describe in a few sentences what a visitor sees in town number {i}." for i in range(N_REQUESTS)]


def _saes(folder: Path) -> dict[str, str]:
    from tests.helpers import make_random_sae

    out = {}
    for layer in range(LAYERS):
        make_random_sae(folder / f"l{layer}", f"blocks.{layer}.resid_post", "jumprelu", d_sae=D_SAE, seed=layer)
        out[f"l{layer}"] = str(folder / f"l{layer}")
    return out


def _weight_bytes(folder: str) -> int:
    """Bytes of the SAE's weights as stored, in float32 (the serving dtype on CPU)."""
    from sae import load_sae

    return sum(p.numel() * 4 for p in load_sae(folder).parameters())


async def _throughput(engine: SAEEngine, specs: list[list[SteeringEntry]], tokens: int) -> tuple[float, int]:
    """Generated tokens per second over all requests, and how many requests failed."""
    sampling = Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(prompt: str, spec: list[SteeringEntry]) -> int:
        n = 0
        async for u in engine.generate(prompt, sampling, spec):
            n += sum(len(o.token_ids) for o in u.outputs)
        return n

    t0 = time.perf_counter()
    results = await asyncio.gather(*[one(p, s) for p, s in zip(PROMPTS, specs, strict=True)], return_exceptions=True)
    elapsed = time.perf_counter() - t0
    failed = [r for r in results if isinstance(r, BaseException)]
    for r in failed[:3]:
        print(f"  failed: {type(r).__name__}: {r}", flush=True)
    return sum(r for r in results if isinstance(r, int)) / elapsed, len(failed)


def _config(saes: dict[str, str], **options) -> EngineConfig:
    return EngineConfig(saes=saes, max_num_seqs=N_REQUESTS, probe_steering=False, **options)


async def _interleaved(
    engine: SAEEngine, conditions: dict[str, list[list[SteeringEntry]]], repeats: int, tokens: int
) -> tuple[dict[str, float], int]:
    await _throughput(engine, conditions["unsteered"], tokens)  # warm-up
    tps: dict[str, list[float]] = {k: [] for k in conditions}
    failed = 0
    for r in range(repeats):
        for name, specs in conditions.items():
            rate, bad = await _throughput(engine, specs, tokens)
            tps[name].append(rate)
            failed += bad
            print(f"repeat {r} {name:12s} {rate:7.1f} tok/s", flush=True)
    return {k: statistics.median(v) for k, v in tps.items()}, failed


async def main(args: argparse.Namespace) -> dict:
    mixed = [
        [SteeringEntry(sae=f"l{(7 * i) % LAYERS}", feature=(31 * i) % D_SAE, value=4.0)] for i in range(N_REQUESTS)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        saes = _saes(Path(tmp))
        async with SAEEngine.started(_config(saes)) as engine:
            conditions = {
                "unsteered": [[] for _ in range(N_REQUESTS)],
                "distinct128": [
                    [SteeringEntry(sae="l15", feature=(97 * i) % D_SAE, value=4.0)] for i in range(N_REQUESTS)
                ],
                "all_layers": [
                    [
                        SteeringEntry(sae=f"l{layer}", feature=(13 * i + layer) % D_SAE, value=2.0)
                        for layer in range(LAYERS)
                    ]
                    for i in range(N_REQUESTS)
                ],
                "mixed": mixed,
            }
            med, failed = await _interleaved(engine, conditions, args.repeats, args.tokens)
            resident = sum(m.resident_bytes for m in engine.saes())
            one_sae = engine.saes()[0].resident_bytes
        weights = sum(_weight_bytes(f) for f in saes.values())
        budget_gib = (RESIDENT_OF_30 + 0.5) * one_sae / 2**30
        async with SAEEngine.started(_config(saes, sae_memory_gib=budget_gib, residency_wait_s=600)) as engine:
            paged, paged_failed = await _interleaved(
                engine, {"unsteered": [[] for _ in range(N_REQUESTS)], "mixed": mixed}, args.repeats, args.tokens
            )
            page_ins = engine.page_ins
    print(f"\n{N_REQUESTS} requests x {args.tokens} tokens, compiled, median of {args.repeats}")
    for name, rate in med.items():
        print(f"{name:12s} {rate:7.1f} tok/s  ratio {rate / med['unsteered']:.3f}")
    print(f"resident SAE bytes {resident} / weight bytes {weights} = {resident / weights:.4f}")
    print(
        f"paged ({RESIDENT_OF_30} of {LAYERS} resident, {page_ins} page-ins): mixed {paged['mixed']:.1f} tok/s vs "
        f"all resident {med['mixed']:.1f} (unsteered on the paged engine {paged['unsteered']:.1f})"
    )
    return {
        "distinct128_ratio": round(med["distinct128"] / med["unsteered"], 3),
        "all_layers_ratio": round(med["all_layers"] / med["unsteered"], 3),
        "sae_bytes_ratio": round(resident / weights, 4),
        "paged_ratio": round(paged["mixed"] / med["mixed"], 3),
        "failed_requests": failed + paged_failed,
    }


if __name__ == "__main__":
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per condition")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    result = asyncio.run(main(parser.parse_args()))
    print(f"machine: {machine.describe()}")  # which vector extensions the figures above were measured with
    print(json.dumps(result))
