"""Hot-load latency: from a publish into the SAE registry to the first steered response that uses the new SAE,
while 16 clients keep streaming.

The service starts on an empty registry. 16 clients stream plain completions back to back the whole time. Each
round publishes the shipped demo SAE (deploy/saes/smollm2-l15-resid-8x) under a new id with the trainer's
`publish` (the same atomic write a finished training job ends with), and a probe asks as fast as it can for a
one-token completion steered with that id until one succeeds. The probe's 400 "unknown SAE" answers before then
are the expected "not yet"; any other failure, of the probe or of a streaming client, counts as failed.
The clock starts before the publish (its copy and checksum included). The last line is JSON:
{"publish_to_first_response_s" (worst round), "median_s", "failed_requests", "streams_completed", ...}.

    python -m benchmarks.hotload [--rounds 5] [--clients 16] [--compiled]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_SAE = ROOT / "deploy/saes/smollm2-l15-resid-8x"
MODEL = "SmolLM2-135M-Instruct"
FEATURE = 3699  # the demo SAE's "food" feature (README)


class Tally:
    def __init__(self) -> None:
        self.completed = 0
        self.failed: list[str] = []


async def stream_forever(client, i: int, stop: asyncio.Event, tally: Tally) -> None:
    body = {
        "model": MODEL,
        "prompt": f"Client {i} tells a long story about the sea:",
        "max_tokens": 64,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
    }
    while not stop.is_set():
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                lines = [line async for line in r.aiter_lines()]
            if r.status_code == 200 and lines and "data: [DONE]" in lines:
                tally.completed += 1
            else:
                tally.failed.append(f"stream {i}: HTTP {r.status_code}")
        except Exception as e:  # counted, not raised: the figure is how many fail
            tally.failed.append(f"stream {i}: {type(e).__name__}: {e}")


async def first_steered_response(client, sae_id: str, tally: Tally) -> None:
    body = {
        "model": MODEL,
        "prompt": "My favourite thing is",
        "max_tokens": 1,
        "temperature": 0,
        "steering": [{"sae": sae_id, "feature": FEATURE, "value": 8.0}],
    }
    while True:
        r = await client.post("/v1/completions", json=body)
        if r.status_code == 200:
            return
        if r.status_code == 400 and f"unknown SAE {sae_id!r}" in r.text:
            await asyncio.sleep(0.02)
            continue
        tally.failed.append(f"probe: HTTP {r.status_code}: {r.text[:200]}")


async def measure(base_url: str, registry: Path, rounds: int, clients: int) -> dict:
    import httpx

    from trainer.publish import publish

    tally = Tally()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        streams = [asyncio.create_task(stream_forever(client, i, stop, tally)) for i in range(clients)]
        await asyncio.sleep(5)  # every stream under way before the first publish
        times = []
        for n in range(rounds):
            sae_id = f"hot-{n}"
            start = time.perf_counter()
            await asyncio.to_thread(publish, DEMO_SAE, registry, sae_id)
            await first_steered_response(client, sae_id, tally)
            times.append(time.perf_counter() - start)
            print(
                f"round {n}: publish -> first steered response {times[-1]:.2f} s "
                f"(streams completed so far {tally.completed}, failed {len(tally.failed)})",
                flush=True,
            )
            await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*streams)
    for failure in tally.failed[:10]:
        print("failed:", failure)
    return {
        "publish_to_first_response_s": round(max(times), 3),
        "median_s": round(statistics.median(times), 3),
        "rounds": rounds,
        "clients": clients,
        "failed_requests": len(tally.failed),
        "streams_completed": tally.completed,
    }


def main(args: argparse.Namespace) -> dict:
    from serve.config import ServiceConfig
    from serve.launch.local_cluster import free_port, running_service

    engine = ServiceConfig.from_yaml(ROOT / "deploy/serve/config.yaml").engine
    engine = engine.model_copy(update={"enforce_eager": not args.compiled, "saes": {}})
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        registry.mkdir()
        config = ServiceConfig(engine=engine, sae_registry=registry, watch_registry=True, port=free_port())
        with running_service(config) as base_url:
            result = asyncio.run(measure(base_url, registry, args.rounds, args.clients))
    result["mode"] = "compiled" if args.compiled else "eager"
    return result


if __name__ == "__main__":
    from benchmarks import machine
    from benchmarks.exits import exit_on_sigterm

    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="publishes to time")
    parser.add_argument("--clients", type=int, default=16, help="clients streaming throughout")
    parser.add_argument("--compiled", action="store_true", help="compiled engine (slower start) instead of eager")
    result = main(parser.parse_args())
    print(f"machine: {machine.describe()}")  # which vector extensions the figures above were measured with
    print(json.dumps(result))
