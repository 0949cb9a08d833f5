"""Service throughput: tokens/s through HTTP (Ray Serve + SSE) against the raw engine and against naive serving.

One workload, three ways, on the same machine (never two at once):
  engine  the SAEEngine in this process, 32 concurrent requests;
  http    the Ray Serve app (ingress + model deployment + SSE), 32 concurrent streaming clients on /v1/completions
          (engine and http runs alternate, both started once, so a busy neighbour slows both alike); the ingress
          answers HTTP itself as under `sae-serve up`, or with --proxy behind Ray's proxy as under KubeRay;
  naive   transformers `generate` with SAE forward hooks (tests/serve/reference.py), one request at a time, the way
          SAELens/TransformerLens-based servers serve.
32 prompts × 128 greedy tokens; every other request is steered (add / clamp / h_bias in turn) on an 8x TopK SAE
at blocks.15.resid_post. Greedy decoding makes the three produce the same tokens. The last line is JSON:
{"http_vs_engine", "vs_naive", ...}.

    python -m benchmarks.service [--eager] [--proxy] [--repeats 5] [--naive-requests 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

N_REQUESTS = 32
NEW_TOKENS = 128
PROMPTS = [f"Story {i}: write a long tale about a traveller who visits city number {i}." for i in range(N_REQUESTS)]
OPS = ("add", "clamp", "h_bias")


def workload(d_sae: int) -> list[tuple[str, list[dict]]]:
    """(prompt, steering entries as JSON) per request: even ones plain, odd ones steered."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        spec = (
            []
            if i % 2 == 0
            else [{"sae": "bench", "feature": (97 * i) % d_sae, "value": 4.0, "op": OPS[(i // 2) % len(OPS)]}]
        )
        out.append((prompt, spec))
    return out


def engine_config(eager: bool) -> dict:
    from serve.config import ServiceConfig

    engine = ServiceConfig.from_yaml(Path(__file__).resolve().parents[1] / "deploy/serve/config.yaml").engine
    return (engine.model_copy(update={"enforce_eager": True}) if eager else engine).model_dump()


async def start_engine(cfg: dict, sae_dir: Path):
    from serve.engine.config import EngineConfig
    from serve.engine.engine import SAEEngine

    return await SAEEngine.start(EngineConfig(**{**cfg, "saes": {"bench": str(sae_dir)}}))


async def engine_once(engine, work) -> float:
    from serve.engine.engine import Sampling
    from serve.specs import SteeringEntry

    sampling = Sampling(max_tokens=NEW_TOKENS, temperature=0.0)

    async def one(prompt, spec) -> int:
        n = 0
        async for u in engine.generate(prompt, sampling, [SteeringEntry(**e) for e in spec]):
            n += sum(len(o.token_ids) for o in u.outputs)
        return n

    t = time.perf_counter()
    counts = await asyncio.gather(*[one(p, s) for p, s in work])
    return sum(counts) / (time.perf_counter() - t)


async def http_once(base_url: str, model: str, work) -> float:
    import httpx

    async def one(client, prompt, spec) -> int:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "steering": spec,
        }
        tokens = 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = usage["completion_tokens"]
        return tokens

    limits = httpx.Limits(max_connections=N_REQUESTS + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        t = time.perf_counter()
        counts = await asyncio.gather(*[one(client, p, s) for p, s in work])
        return sum(counts) / (time.perf_counter() - t)


async def compare(cfg: dict, sae_dir: Path, base_url: str, work, repeats: int) -> tuple[float, float]:
    """Median tokens/s of the raw engine and of HTTP, runs alternating so that a busy neighbour slows both alike."""
    engine = await start_engine(cfg, sae_dir)
    try:  # the engine is shut down on every way out (exceptions, Ctrl-C, SIGTERM: see benchmarks/exits.py)
        model = "SmolLM2-135M-Instruct"
        await engine_once(engine, work)  # warm-up of both
        await http_once(base_url, model, work)
        runs: dict[str, list[float]] = {"engine": [], "http": []}
        for r in range(repeats):
            runs["engine"].append(await engine_once(engine, work))
            runs["http"].append(await http_once(base_url, model, work))
            print(f"repeat {r}: engine {runs['engine'][-1]:7.1f} tok/s, http {runs['http'][-1]:7.1f} tok/s", flush=True)
    finally:
        engine.shutdown()
    return statistics.median(runs["engine"]), statistics.median(runs["http"])


def serve_and_compare(cfg: dict, registry: Path, work, repeats: int, proxy: bool) -> tuple[float, float]:
    """The service (idle while the engine runs and the other way round) and the raw engine, side by side."""
    from serve.config import ServiceConfig
    from serve.launch.local_cluster import free_port, running_service

    config = ServiceConfig.model_validate(
        {"engine": cfg, "sae_registry": str(registry), "port": free_port(), "direct_ingress": not proxy}
    )
    with running_service(config) as base_url:
        return asyncio.run(compare(cfg, registry / "bench", base_url, work, repeats))


def naive_run(sae_dir: Path, work, n: int, threads: int) -> float:
    """One request at a time through transformers generate, steered requests with SAE forward hooks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae import load_sae
    from serve.engine.model_files import resolve_model
    from serve.specs import SteeringEntry
    from tests.serve.reference import steered

    # One thread is the naive server's best case here: on two cores with a busy neighbour, two threads decode slower.
    torch.set_num_threads(threads)
    model_dir = resolve_model("embedded", prepare=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    saes = {"bench": load_sae(sae_dir)}
    tokens, elapsed = 0, 0.0
    for prompt, spec in work[:n]:
        ids = tok(prompt, return_tensors="pt").input_ids
        entries = [SteeringEntry(**e) for e in spec]
        t = time.perf_counter()
        with torch.no_grad(), steered(model, saes if entries else {}, entries, ids.shape[1]):
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
        elapsed += time.perf_counter() - t
        tokens += out.shape[1] - ids.shape[1]
        print(
            f"naive  request {len(spec) and spec[0]['op'] or 'plain':6s}: {out.shape[1] - ids.shape[1]} tokens, "
            f"{tokens / elapsed:6.1f} tok/s so far",
            flush=True,
        )
    return tokens / elapsed


def main(args: argparse.Namespace) -> dict:
    from tests.helpers import make_random_sae

    cfg = engine_config(args.eager)
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        sae = make_random_sae(registry / "bench", "blocks.15.resid_post", "topk", d_sae=4608, k=32)
        work = workload(sae.cfg.d_sae)
        engine_tps, http_tps = serve_and_compare(cfg, registry, work, args.repeats, args.proxy)
        naive_tps = naive_run(registry / "bench", work, args.naive_requests, args.naive_threads)
    mode = "eager" if args.eager else "compiled"
    ingress = "proxy" if args.proxy else "direct"
    print(
        f"\nmode {mode}, ingress {ingress}; {N_REQUESTS} requests x {NEW_TOKENS} greedy tokens, half steered; "
        f"median of {args.repeats}"
    )
    print(f"engine {engine_tps:7.1f} tok/s")
    print(f"http   {http_tps:7.1f} tok/s")
    print(
        f"naive  {naive_tps:7.1f} tok/s ({args.naive_requests} requests, one at a time, "
        f"{args.naive_threads} torch thread(s))"
    )
    return {
        "http_vs_engine": round(http_tps / engine_tps, 3),
        "vs_naive": round(http_tps / naive_tps, 2),
        "http_tok_s": round(http_tps, 1),
        "engine_tok_s": round(engine_tps, 1),
        "naive_tok_s": round(naive_tps, 1),
        "mode": mode,
        "ingress": ingress,
    }


if __name__ == "__main__":
    from benchmarks import machine
    from benchmarks.exits import exit_on_sigterm

    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: the deploy config's mode)")
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="Ray's proxy in front of the ingress (direct_ingress: false), as under serve run and KubeRay",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the workload per side (median)")
    parser.add_argument("--naive-requests", type=int, default=4, help="requests timed on the naive server")
    parser.add_argument("--naive-threads", type=int, default=1, help="torch threads of the naive server")
    result = main(parser.parse_args())
    print(f"machine: {machine.describe()}")  # which vector extensions the figures above were measured with
    print(json.dumps(result))
