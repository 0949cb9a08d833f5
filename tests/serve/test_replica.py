"""The model replica (`serve.replica.deployment.SAEModel`) against a fake engine and a fake directory handle:
no vLLM, no Ray. SAE folders are real (tests.helpers.make_random_sae) and read by the real `sae` package."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import pytest

from serve.config import ServiceConfig
from serve.directory.deployment import SAEDirectory
from serve.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest, NotFound, SpecError
from serve.protocol import ActivationsRequest, ChatCompletionRequest, CompletionRequest, StreamItem
from serve.replica import deployment
from serve.replica.deployment import SAEModel
from serve.replica.prompting import PromptRenderer
from tests.helpers import make_random_sae
from tests.serve.fake_engine import DirectoryUnreachable, FakeDirectoryHandle, FakeEngine, script_tokens

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

HOOK = "blocks.10.resid_post"
MODEL = "SmolLM2-135M-Instruct"
SCRIPT = " one two three four five"
QUIET = 1000.0  # a sync interval that never elapses during a test


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config(**overrides) -> dict:
    base = ServiceConfig().model_dump(mode="json")
    base.update(watch_registry=False, sae_sync_interval_s=QUIET)
    return _merge(base, overrides)


@pytest.fixture
def registry(tmp_path) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    return root


@functools.cache
def _shared_renderer(model_dir: Path) -> PromptRenderer:
    return PromptRenderer(model_dir)


@pytest.fixture
async def replicas(monkeypatch):
    """`await make(directory, **config_overrides, engine_kw={...})` -> an SAEModel; background tasks cancelled after.

    Replicas share one tokenizer (PromptRenderer is read-only once built; loading it costs ~0.5 s per replica)."""
    monkeypatch.setattr(deployment, "PromptRenderer", _shared_renderer)
    made: list[SAEModel] = []

    async def make(directory: SAEDirectory, engine_kw: dict | None = None, **overrides) -> SAEModel:
        async def factory(engine_config):
            return FakeEngine(engine_config, **(engine_kw or {}))

        model = SAEModel.__new__(SAEModel)
        made.append(model)
        await model.__init__(config(**overrides), FakeDirectoryHandle(directory), factory)
        return model

    yield make
    tasks = [t for m in made for t in (getattr(m, "_sync_task", None), getattr(m, "_watch_task", None)) if t]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def completion(**kw) -> CompletionRequest:
    return CompletionRequest(**{"model": MODEL, "prompt": "Hello there", "max_tokens": 16, **kw})


async def collect(model: SAEModel, req, version: int = 0) -> list[StreamItem]:
    return [item async for item in model.generate(req, version)]


def text_of(items: list[StreamItem]) -> str:
    return "".join(d.text for item in items for d in item.deltas)


async def eventually(predicate, timeout_s: float = 3.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def ids(infos) -> dict[str, int]:
    return {i.id: i.d_sae for i in infos}


# --- 1. SAE-set convergence ------------------------------------------------------------------------------------------


async def test_replica_catches_up_on_request_with_newer_version(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    directory = SAEDirectory({})
    a, b = await replicas(directory, sae_registry=str(registry)), await replicas(directory, sae_registry=str(registry))

    info, version = await a.load_sae("s1", None)
    assert info.id == "s1" and info.d_sae == 64
    assert ids(await a.saes()) == {"s1": 64}
    assert ids(await b.saes()) == {}  # B has not synced: its interval never elapses
    assert ids(await b.saes(version)) == {"s1": 64}  # a caller that saw the new set makes B catch up

    # New weights under the same id and folder reach B too (the entry's version changes, not its path).
    make_random_sae(registry / "s1", HOOK, d_sae=128, seed=2)
    _, version = await a.load_sae("s1", None)
    assert ids(await b.saes(version)) == {"s1": 128}
    assert {i.version for i in await a.saes()} == {i.version for i in await b.saes()}

    version = await a.unload_sae("s1")
    assert ids(await b.saes()) == {"s1": 128}
    assert ids(await b.saes(version)) == {}


async def test_replica_catches_up_for_steering_naming_an_sae_it_lacks(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    directory = SAEDirectory({})
    a, b = await replicas(directory, sae_registry=str(registry)), await replicas(directory, sae_registry=str(registry))
    await a.load_sae("s1", None)

    # Version 0 (the caller knows nothing newer), but the steering names s1: B syncs before validating.
    items = await collect(b, completion(steering=[{"sae": "s1", "feature": 3, "value": 4.0}]))
    assert text_of(items) == " one two three"
    assert items[-1].finished
    assert ids(await b.saes()) == {"s1": 64}

    # Capture requests catch up the same way.
    make_random_sae(registry / "s2", HOOK, d_sae=32, seed=3)
    await a.load_sae("s2", None)
    resp = await b.activations(ActivationsRequest(input="Hello there", saes=["s2"], top_k=2), 0)
    assert resp.saes == ["s2"] and resp.tokens and all(t.saes is not None for t in resp.tokens)
    assert all(len(t.saes["s2"].top) == 2 for t in resp.tokens)


async def test_replica_converges_on_its_own_within_the_sync_interval(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    directory = SAEDirectory({})
    a = await replicas(directory, sae_registry=str(registry))
    b = await replicas(directory, sae_registry=str(registry), sae_sync_interval_s=0.05)

    await a.load_sae("s1", None)
    start = time.monotonic()

    async def b_serves():
        return ids(await b.saes()) == {"s1": 64}  # version 0: never forces a sync

    await eventually(b_serves, 2.0, "B to load s1 by its periodic sync")
    assert time.monotonic() - start < 2.0
    items = await collect(b, completion(steering=[{"sae": "s1", "feature": 0, "value": 1.0}]))
    assert items[-1].finished


async def test_periodic_sync_survives_an_unreachable_directory(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    directory = SAEDirectory({})
    a = await replicas(directory, sae_registry=str(registry))
    b = await replicas(directory, sae_registry=str(registry), sae_sync_interval_s=0.02)
    b._saes._directory.unreachable = True  # B's handle only
    await a.load_sae("s1", None)
    await asyncio.sleep(0.15)  # several failed syncs
    assert ids(await b.saes()) == {}
    b._saes._directory.unreachable = False

    async def b_serves():
        return ids(await b.saes()) == {"s1": 64}

    await eventually(b_serves, 2.0, "B to converge once the directory answers again")


async def test_new_replica_starts_with_the_directory_set(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    directory = SAEDirectory({})
    a = await replicas(directory, sae_registry=str(registry))
    await a.load_sae("s1", "steer-me")
    c = await replicas(directory, sae_registry=str(registry))  # a replacement replica started later
    assert ids(await c.saes()) == {"steer-me": 64}


async def test_lost_publish_leaves_replicas_agreeing(replicas, registry):
    """A's put to the directory is lost: the admin call fails, and A must not go on serving an SAE that the
    directory (and so every other replica) does not have."""
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    directory = SAEDirectory({})
    a, b = await replicas(directory, sae_registry=str(registry)), await replicas(directory, sae_registry=str(registry))
    a._saes._directory.drop_puts = 1
    with pytest.raises(DirectoryUnreachable):
        await a.load_sae("s1", None)
    version = directory.snapshot().version
    assert ids(await b.saes(version)) == {}
    assert ids(await a.saes(version)) == {}


# --- 2. an engine that dies mid-stream -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_engine_dying_mid_stream_raises_engine_unavailable(replicas, stream):
    model = await replicas(SAEDirectory({}), engine_kw={"script": SCRIPT, "die_after": 2}, stream_batch_ms=0)
    items: list[StreamItem] = []
    with pytest.raises(EngineUnavailable):
        async for item in model.generate(completion(stream=stream), 0):
            items.append(item)
    assert items, "the updates before the failure are delivered"
    assert not any(item.finished for item in items), "a dead engine must not end the stream normally"
    assert sum(d.num_tokens for item in items for d in item.deltas) <= 2
    assert not any(d.finish_reason for item in items for d in item.deltas)
    if stream:
        assert text_of(items) == " one two"
    # The replica reports the dead engine: to Ray Serve's health check, to the health endpoint, to new requests.
    with pytest.raises(RuntimeError):
        model.check_health()
    with pytest.raises(EngineUnavailable):
        await model.health()
    with pytest.raises(EngineUnavailable):
        await collect(model, completion())


async def test_engine_dead_before_first_token(replicas):
    model = await replicas(SAEDirectory({}), engine_kw={"die_after": 0})
    gen = model.generate(completion(stream=True), 0)
    with pytest.raises(EngineUnavailable):
        await gen.__anext__()


async def test_cancelled_stream_aborts_the_engine_request(replicas):
    """A client that goes away (Ray cancels the streaming call) stops the generation in the engine."""
    model = await replicas(SAEDirectory({}), engine_kw={"script": SCRIPT, "token_delay_s": 0.05}, stream_batch_ms=0)
    engine = model._engine
    first = asyncio.Event()

    async def consume():
        async for _ in model.generate(completion(stream=True), 0):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    async def released():
        return not engine.active

    await eventually(released, 1.0, "the engine request to be aborted")
    assert engine.updates_yielded < len(script_tokens(SCRIPT))
    assert len(engine.aborted) == 1
    assert model._streams == 0


# --- 3. registry publishes -------------------------------------------------------------------------------------------


def _broken(kind: str, folder: Path) -> None:
    if kind == "d_in":
        make_random_sae(folder, HOOK, d_in=64, d_sae=32, seed=5)
    else:  # a hook point past the model's 30 layers
        make_random_sae(folder, "blocks.40.resid_post", d_sae=32, seed=5)


async def _status(model: SAEModel) -> dict:
    return {e.id: e for e in (await model.registry_status()).entries}


@pytest.mark.parametrize("kind", ["d_in", "layer"])
async def test_rejected_publish_keeps_the_old_sae(replicas, registry, tmp_path, kind):
    from trainer.publish import publish

    model = await replicas(
        SAEDirectory({}), sae_registry=str(registry), watch_registry=True, registry_poll_interval_s=0.02
    )
    make_random_sae(tmp_path / "good", HOOK, d_sae=64, seed=1)
    publish(tmp_path / "good", registry, "r1")

    async def loaded():
        e = (await _status(model)).get("r1")
        return e is not None and e.version == 1 and e.state == "loaded"

    await eventually(loaded, 3.0, "publish 1 to load")
    before = await model.saes()
    assert ids(before) == {"r1": 64}

    _broken(kind, tmp_path / "bad")
    publish(tmp_path / "bad", registry, "r1")  # the trainer's checks pass: only the model's fit is wrong

    async def rejected():
        e = (await _status(model)).get("r1")
        return e if e is not None and e.version == 2 and e.state == "rejected" else None

    entry = await eventually(rejected, 3.0, "publish 2 to be rejected")
    assert entry.error and ("d_in" in entry.error if kind == "d_in" else "out of range" in entry.error)
    assert await model.saes() == before  # same SAE, same weights version
    items = await collect(model, completion(steering=[{"sae": "r1", "feature": 63, "value": 2.0}]))
    assert items[-1].finished

    # A later good publish clears the rejection.
    make_random_sae(tmp_path / "good2", HOOK, d_sae=96, seed=7)
    publish(tmp_path / "good2", registry, "r1")

    async def reloaded():
        e = (await _status(model)).get("r1")
        return e is not None and e.version == 3 and e.state == "loaded" and e.error is None

    await eventually(reloaded, 3.0, "publish 3 to load")
    assert ids(await model.saes()) == {"r1": 96}


async def test_rejected_publish_keeps_the_old_feature_cards(replicas, registry, tmp_path):
    from trainer.publish import publish

    model = await replicas(
        SAEDirectory({}), sae_registry=str(registry), watch_registry=True, registry_poll_interval_s=0.02
    )
    make_random_sae(tmp_path / "good", HOOK, d_sae=64, seed=1)
    publish(tmp_path / "good", registry, "r1")

    async def state(version, want):
        e = (await _status(model)).get("r1")
        return e is not None and e.version == version and e.state == want

    await eventually(lambda: state(1, "loaded"), 3.0, "publish 1 to load")
    _broken("d_in", tmp_path / "bad")
    publish(tmp_path / "bad", registry, "r1")
    await eventually(lambda: state(2, "rejected"), 3.0, "publish 2 to be rejected")
    card = await model.sae_card("r1")
    assert card.d_in == 576 and card.d_sae == 64
    feature = await model.feature("r1", 3, 5)
    assert len(feature.top_tokens) == 5


async def test_publish_claimed_by_a_dead_replica_is_loaded_by_its_replacement(replicas, registry, tmp_path):
    from trainer.publish import publish

    directory = SAEDirectory({})
    kw = dict(sae_registry=str(registry), watch_registry=True, registry_poll_interval_s=0.02)
    a = await replicas(directory, **kw)
    a._engine.kill()  # A's engine dies; Ray Serve's health check will replace A
    make_random_sae(tmp_path / "good", HOOK, d_sae=64, seed=1)
    publish(tmp_path / "good", registry, "r1")
    await asyncio.sleep(0.2)  # A's watcher polls the new manifest and fails to load it
    b = await replicas(directory, **kw)  # the replacement

    async def b_serves():
        return ids(await b.saes()) == {"r1": 64}

    await eventually(b_serves, 1.0, "the replacement to load the publish")


async def test_one_publish_is_loaded_by_one_replica_and_followed_by_the_others(replicas, registry, tmp_path):
    from trainer.publish import publish

    directory = SAEDirectory({})
    kw = dict(sae_registry=str(registry), watch_registry=True, registry_poll_interval_s=0.02, sae_sync_interval_s=0.05)
    a, b = await replicas(directory, **kw), await replicas(directory, **kw)
    start_version = directory.snapshot().version
    make_random_sae(tmp_path / "good", HOOK, d_sae=64, seed=1)
    publish(tmp_path / "good", registry, "r1")

    async def both():
        return ids(await a.saes()) == {"r1": 64} and ids(await b.saes()) == {"r1": 64}

    await eventually(both, 3.0, "both replicas to serve the publish")
    assert directory.snapshot().version == start_version + 1  # one replica validated and put it, once


# --- 4. typed errors -------------------------------------------------------------------------------------------------


async def test_unknown_sae_in_steering_is_a_spec_error(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    model = await replicas(SAEDirectory({}), sae_registry=str(registry))
    await model.load_sae("s1", None)
    with pytest.raises(SpecError) as e:
        await collect(model, completion(steering=[{"sae": "nope", "feature": 0, "value": 1.0}]))
    assert e.value.param == "steering[0].sae" and "nope" in e.value.message
    with pytest.raises(SpecError) as e:
        await collect(
            model,
            completion(
                steering=[{"sae": "s1", "feature": 0, "value": 1.0}, {"sae": "s1", "feature": 64, "value": 1.0}]
            ),
        )
    assert e.value.param == "steering[1].feature"
    with pytest.raises(SpecError) as e:
        await model.activations(ActivationsRequest(input="hi", saes=["s1", "nope"]), 0)
    assert e.value.param == "saes[1]"
    assert model._engine.updates_yielded == 0  # nothing reached the engine's queue
    assert not model._engine.active


async def test_too_long_prompt_names_the_field(replicas):
    model = await replicas(SAEDirectory({}), limits={"max_prompt_tokens": 48}, engine={"max_model_len": 64})
    with pytest.raises(ContextLengthExceeded) as e:
        await collect(model, completion(prompt="word " * 60))
    assert isinstance(e.value, InvalidRequest) and e.value.param == "prompt" and "prompt" in e.value.message
    with pytest.raises(ContextLengthExceeded) as e:
        await collect(model, ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "word " * 60}]))
    assert e.value.param == "messages"
    with pytest.raises(ContextLengthExceeded) as e:
        await collect(model, completion(prompt="Hi", max_tokens=100))
    assert e.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceeded) as e:
        await collect(
            model,
            ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=100),
        )
    assert e.value.param == "max_completion_tokens"
    with pytest.raises(InvalidRequest) as e:
        await collect(model, completion(prompt=[1, 10**6]))
    assert e.value.param == "prompt"


async def test_not_found_errors(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    model = await replicas(SAEDirectory({}), sae_registry=str(registry))
    await model.load_sae("s1", None)
    for index in (64, -1, 10**6):
        with pytest.raises(NotFound) as e:
            await model.feature("s1", index, 5)
        assert e.value.param == "feature" and e.value.code == "feature_not_found"
    with pytest.raises(NotFound) as e:
        await model.feature("nope", 0, 5)
    assert e.value.code == "sae_not_found"
    with pytest.raises(NotFound):
        await model.sae_card("nope")
    with pytest.raises(NotFound):
        await model.unload_sae("nope")
    with pytest.raises(NotFound) as e:
        await model.sae_plot("s1", "../sae.json")
    assert e.value.code == "plot_not_found"


async def test_bad_admin_loads_are_invalid_requests_and_change_nothing(replicas, registry, tmp_path):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    make_random_sae(registry / "wide", HOOK, d_in=64, d_sae=32, seed=2)
    make_random_sae(tmp_path / "outside", HOOK, d_sae=32, seed=3)
    make_random_sae(registry / "corrupt", HOOK, d_sae=32, seed=4)
    (registry / "corrupt" / "sae.safetensors").write_bytes(b"not a safetensors file")
    directory = SAEDirectory({})
    model = await replicas(directory, sae_registry=str(registry))
    await model.load_sae("s1", None)
    version = directory.snapshot().version
    for path, sae_id, param in [
        ("wide", "s1", "path"),
        ("corrupt", None, "path"),
        (str(tmp_path / "outside"), None, "path"),
        ("missing", None, "path"),
        ("~no-such-user-here/s1", None, "path"),  # pathlib cannot expand it: RuntimeError, not a 500
        ("s1", "bad id!", "id"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            await model.load_sae(path, sae_id)
        assert e.value.param == param, (path, e.value)
    assert ids(await model.saes()) == {"s1": 64}
    assert directory.snapshot().version == version


async def test_load_without_registry_is_invalid(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    model = await replicas(SAEDirectory({}))
    with pytest.raises(InvalidRequest) as e:
        await model.load_sae(str(registry / "s1"), None)
    assert e.value.param == "path"


# --- 5. stream batching ----------------------------------------------------------------------------------------------


async def test_stream_batches_after_the_first_token(replicas):
    model = await replicas(
        SAEDirectory({}), engine_kw={"script": SCRIPT, "token_delay_s": 0.01}, stream_batch_ms=60_000
    )
    words = [t for _, t in script_tokens(SCRIPT)]
    start = time.monotonic()
    items = await collect(model, completion(stream=True))
    assert time.monotonic() - start < 5  # the end of the stream closes the window
    assert [text_of([i]) for i in items] == [words[0], "".join(words[1:])]
    assert [d.num_tokens for i in items for d in i.deltas] == [1, len(words) - 1]
    assert [i.finished for i in items] == [False, True]
    assert items[-1].deltas[0].finish_reason == "stop"
    assert all(i.prompt_tokens == items[0].prompt_tokens > 0 for i in items)


async def test_first_streamed_token_is_not_held_by_the_window(replicas):
    model = await replicas(SAEDirectory({}), engine_kw={"script": SCRIPT, "token_delay_s": 0.5}, stream_batch_ms=60_000)
    gen = model.generate(completion(stream=True), 0)
    start = time.monotonic()
    first = await gen.__anext__()  # the second token is 0.5 s away, the end 2 s
    assert time.monotonic() - start < 0.45 and first.deltas[0].num_tokens == 1 and not first.finished
    await gen.aclose()


async def test_unbatched_stream_sends_every_token(replicas):
    # stream_batch_ms is the shortest window; the load-based one (streams / stream_messages_per_s) must be short too.
    model = await replicas(
        SAEDirectory({}),
        engine_kw={"script": SCRIPT, "token_delay_s": 0.05},
        stream_batch_ms=0,
        stream_messages_per_s=10_000,
    )
    items = await collect(model, completion(stream=True))
    assert [text_of([i]) for i in items] == [t for _, t in script_tokens(SCRIPT)]


@pytest.mark.parametrize("batch_ms", [0, 60_000])
async def test_non_streaming_result_merges_all_after_the_first(replicas, batch_ms):
    model = await replicas(
        SAEDirectory({}), engine_kw={"script": SCRIPT, "token_delay_s": 0.005}, stream_batch_ms=batch_ms
    )
    words = [t for _, t in script_tokens(SCRIPT)]
    items = await collect(model, completion(stream=False, n=2, logprobs=1))
    assert len(items) == 2
    assert [d.num_tokens for d in items[0].deltas] == [1, 1]
    assert [(d.index, d.text, d.num_tokens) for d in items[1].deltas] == [
        (0, "".join(words[1:]), len(words) - 1),
        (1, "".join(words[1:]), len(words) - 1),
    ]
    assert [len(d.logprobs) for d in items[1].deltas] == [len(words) - 1] * 2
    assert items[1].deltas[0].logprobs[0].token == words[1]


async def test_steering_report_rides_on_the_last_item(replicas, registry):
    make_random_sae(registry / "s1", HOOK, d_sae=64, seed=1)
    model = await replicas(
        SAEDirectory({}),
        engine_kw={"script": SCRIPT, "token_delay_s": 0.02},
        stream_batch_ms=0,
        stream_messages_per_s=10_000,
        sae_registry=str(registry),
    )
    await model.load_sae("s1", None)
    steering = [
        {"sae": "s1", "feature": 1, "value": 2.0},
        {"sae": "s1", "feature": 2, "value": 2.0, "positions": "generated"},
    ]
    items = await collect(model, completion(stream=True, steering=steering))
    assert len(items) >= 3  # (one per token but on a stalled machine)
    assert all(i.steering_report is None for i in items[:-1])
    assert [(r.index, r.status) for r in items[-1].steering_report] == [(0, "applied"), (1, "applied")]
    assert all(i.steering_report is None for i in await collect(model, completion(stream=True)))


async def test_max_tokens_cuts_the_stream(replicas):
    model = await replicas(SAEDirectory({}), engine_kw={"script": SCRIPT})
    items = await collect(model, completion(max_tokens=2))
    assert text_of(items) == "".join(t for _, t in script_tokens(SCRIPT)[:2])
    assert items[-1].deltas[0].finish_reason == "length" and items[-1].finished
