"""SIGKILL of the model replica's process under streaming load: every request ends (bounded) in success or a clean
503 in the OpenAI shape, requests sent while the replica is down are refused with a 503 rather than held until the
replacement is up, and the service recovers by itself (Ray Serve replaces the replica, the new engine starts and
loads the directory's SAEs). Disruptive: it runs after every other test of the session (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.faults.openai_shape import openai_error

STREAMS = 8
REQUEST_TIMEOUT_S = 300  # longer than a replica restart under load; a request past it counts as a hang
RECOVERY_TIMEOUT_S = 360
MODEL_REPLICA_TITLE = "ray::ServeReplica:sae-serve:SAEModel"
DOWN_CODES = {"model_unavailable", "engine_unavailable"}
STORY = [{"role": "user", "content": "Tell me a long story about the sea."}]


def model_replica_pids() -> list[int]:
    """This session's model replica processes: they descend from this process (the `service` fixture started
    Ray), so other services on the machine are never touched."""
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline()).strip()
            # While an actor runs a task Ray appends its name to the title (ray::ServeController.listen_for_change).
            if title == MODEL_REPLICA_TITLE or title.startswith(MODEL_REPLICA_TITLE + "."):
                pids.append(proc.pid)
        except psutil.Error:
            pass
    return pids


def _down_error(body: object) -> str:
    """'down' for an OpenAI-shaped error saying the model is unavailable; otherwise the failure's description."""
    err = openai_error(body)
    if err is None or err["code"] not in DOWN_CODES or err["type"] != "service_unavailable_error":
        return f"not a clean unavailable error: {body}"
    return "down"


async def _stream(client: httpx.AsyncClient, started: asyncio.Event) -> str:
    body = {"model": "SmolLM2-135M-Instruct", "messages": STORY, "max_tokens": 128, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return await _refused(r)
        last = None
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                started.set()
                last = line.removeprefix("data: ")
                if last != "[DONE]" and "error" in json.loads(last):
                    return _down_error(json.loads(last))
        return "ok" if last == "[DONE]" else f"stream ended without [DONE]: {last}"


async def _refused(r: httpx.Response) -> str:
    await r.aread()
    if r.status_code != 503 or not r.headers.get("retry-after"):
        return f"{r.status_code} (retry-after {r.headers.get('retry-after')}): {r.text[:300]}"
    return _down_error(r.json())


async def _completion(client: httpx.AsyncClient) -> str:
    r = await client.post(
        "/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 64}
    )
    return "ok" if r.status_code == 200 else await _refused(r)


async def _bounded(request) -> str:
    try:
        return await asyncio.wait_for(request, REQUEST_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {REQUEST_TIMEOUT_S} s"
    except httpx.HTTPError as e:
        return f"transport error: {e!r}"


async def _kill_under_load(service, pid: int) -> tuple[list[str], list[str]]:
    """(outcomes of requests in flight at the kill, outcomes of requests sent while the replica was down)."""
    headers = {"Authorization": f"Bearer {service.user_key}"}
    async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        started = asyncio.Event()
        in_flight = [asyncio.create_task(_bounded(_stream(client, started))) for _ in range(STREAMS)]
        in_flight += [asyncio.create_task(_bounded(_completion(client))) for _ in range(2)]
        await asyncio.wait_for(started.wait(), 120)
        os.kill(pid, signal.SIGKILL)
        # Once an in-flight request has been told the model is down, the ingress knows it too.
        pending = set(in_flight)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t.result() == "down" for t in done):
                break
        sent_while_down = [
            asyncio.create_task(_bounded(_stream(client, asyncio.Event()))),
            asyncio.create_task(_bounded(_completion(client))),
        ]
        return list(await asyncio.gather(*in_flight)), list(await asyncio.gather(*sent_while_down))


def _wait_until_healthy(service) -> float:
    start = time.monotonic()
    with service.http(key=None) as http:
        while time.monotonic() - start < RECOVERY_TIMEOUT_S:
            try:
                if http.get("/health", timeout=30).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(2)
    pytest.fail(f"/health did not answer 200 within {RECOVERY_TIMEOUT_S} s of the kill")


@pytest.mark.disruptive
def test_killed_model_replica_gives_clean_503s_and_recovers(service, record_property):
    (pid,) = model_replica_pids()
    # A thread of its own: the browser tests' Playwright (sync API) keeps an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight, sent_while_down = pool.submit(asyncio.run, _kill_under_load(service, pid)).result()
    assert set(in_flight) <= {"ok", "down"}, in_flight
    assert "down" in in_flight, f"the kill hit no request in flight: {in_flight}"
    # Refused at once: held until the replacement's engine is up (a minute or more), they would have been "ok".
    assert sent_while_down == ["down", "down"], sent_while_down

    record_property("recovery_s", round(_wait_until_healthy(service), 1))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert len(model_replica_pids()) == 1
    with service.http() as http:
        r = http.post("/v1/chat/completions", json={"model": service.model, "messages": STORY, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert [s["id"] for s in http.get("/v1/saes").json()["data"]] == ["toy"]
        steered = http.post(
            "/v1/completions",
            json={
                "model": service.model,
                "prompt": "The sea",
                "max_tokens": 4,
                "steering": [{"sae": "toy", "feature": 1, "value": 4.0}],
            },
        )
        assert steered.status_code == 200, steered.text
