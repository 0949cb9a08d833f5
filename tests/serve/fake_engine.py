"""Test doubles of the model replica's collaborators: an engine without vLLM, a directory without Ray.

`FakeEngine` mimics `serve.engine.engine.SAEEngine` where the replica can tell: it reads and validates SAE folders
with the real `sae` package (a bad folder raises as in the real engine), records `SAEMeta` the same way, validates
steering and capture specs with `serve.specs` before yielding anything, and streams a scripted sequence of tokens as
`GenerationUpdate`s. `die_after` makes it die mid-stream, as vLLM's engine core does.

`FakeDirectoryHandle` wraps a real `SAEDirectory` so that each of its methods is reached as
`handle.method.remote(*args)` returning an awaitable, like a Ray Serve handle; arguments and results are copied
through pickle, as across Ray, so no replica shares state with the directory by accident.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import pickle
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from serve.directory.deployment import SAEDirectory
from serve.engine.config import EngineConfig
from serve.engine.engine import GenerationUpdate, OutputDelta, SAEEngine, Sampling, _report, read_sae
from serve.errors import EngineUnavailable
from serve.specs import CaptureSpec, SAEMeta, SteeringEntry

# The embedded model (SmolLM2-135M-Instruct), as the real engine reports after `sae_attach`.
D_MODEL = 576
N_LAYERS = 30
DEFAULT_SCRIPT = " one two three"


@functools.cache
def _tokenizer(model_dir: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


@functools.cache
def model_dir() -> Path:
    """The prepared embedded model folder (tokenizer files included)."""
    from serve.engine.model_files import resolve_model

    return resolve_model("embedded")


@functools.lru_cache(maxsize=64)
def script_tokens(text: str = DEFAULT_SCRIPT) -> tuple[tuple[int, str], ...]:
    """(token id, token text) of `text` under the embedded model's tokenizer."""
    tok = _tokenizer(str(model_dir()))
    ids = tok.encode(text, add_special_tokens=False).ids
    return tuple((t, tok.decode([t], skip_special_tokens=False)) for t in ids)


class FakeEngine:
    """An engine that answers every prompt with `script`, one token per update.

    `token_delay_s`: seconds between updates (a decode step). `die_after`: after this many updates yielded over the
    engine's life (health probes included), the engine dies: the stream raises `EngineUnavailable`, `running`
    turns False and every later call raises `EngineUnavailable` too. `kill()` kills it at once.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        script: str = DEFAULT_SCRIPT,
        token_delay_s: float = 0.0,
        die_after: int | None = None,
    ):
        self.config = config or EngineConfig()
        self.model_dir = model_dir()
        self.d_model = D_MODEL
        self.n_layers = N_LAYERS
        self.static_steering = False
        self.script = script_tokens(script)
        self.token_delay_s = token_delay_s
        self.die_after = die_after
        self.updates_yielded = 0
        self.active: set[str] = set()  # request ids of generations started and not yet finished or aborted
        self.aborted: list[str] = []
        self._alive = True
        self.steering_refused: str | None = None  # set it to refuse steering, as after a failed start-up probe
        self._saes: dict[str, SAEMeta] = {}
        self._sae_lock = asyncio.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._alive

    def kill(self) -> None:
        """The engine core dies (as on a worker crash)."""
        self._alive = False

    def shutdown(self) -> None:
        self._alive = False

    def _check_running(self) -> None:
        if not self._alive:
            raise EngineUnavailable()

    # --- SAEs --------------------------------------------------------------------------------------------------
    def saes(self) -> list[SAEMeta]:
        return list(self._saes.values())

    async def load_sae(self, path: str | Path, sae_id: str | None = None) -> SAEMeta:
        """As SAEEngine.load_sae: read and validate the folder (raising for a bad one), then record its meta."""
        self._check_running()
        path = Path(path)
        module, meta = read_sae(path, sae_id or path.name, self.d_model, self.n_layers)
        meta = dataclasses.replace(
            meta, resident_bytes=sum(t.numel() * t.element_size() for t in module.state_dict().values())
        )
        sae_id = meta.sae_id
        async with self._sae_lock:
            await asyncio.sleep(0)  # the workers' RPC
            self._check_running()
            self._saes[sae_id] = meta
        return meta

    async def unload_sae(self, sae_id: str) -> None:
        self._check_running()
        async with self._sae_lock:
            if sae_id not in self._saes:
                raise KeyError(sae_id)
            del self._saes[sae_id]
            await asyncio.sleep(0)

    # --- generation --------------------------------------------------------------------------------------------
    # The real engine's checks, on this engine's SAEs, config and refusal.
    _check_specs = SAEEngine._check_specs

    def _tick(self) -> None:
        """Count one update; die when `die_after` is reached."""
        if self.die_after is not None and self.updates_yielded >= self.die_after:
            self._alive = False
        self._check_running()
        self.updates_yielded += 1

    async def generate(
        self,
        prompt: str | list[int],
        sampling: Sampling,
        steering: list[SteeringEntry] = (),
        capture: CaptureSpec | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[GenerationUpdate]:
        """Stream the script (cut at max_tokens); raises SpecError before anything is yielded if a spec is bad."""
        steering = list(steering)
        self._check_running()
        self._check_specs(steering, capture, sampling.n)
        prompt_ids = list(prompt) if not isinstance(prompt, str) else [t for t, _ in script_tokens(prompt)]
        request_id = request_id or uuid.uuid4().hex
        steps = self.script[: sampling.max_tokens]
        if not steps:
            steps = self.script[:1]
        self.active.add(request_id)
        finished = False
        try:
            for i, (tid, text) in enumerate(steps):
                if i and self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                else:
                    await asyncio.sleep(0)
                self._tick()
                last = i == len(steps) - 1
                reason = None
                if last:
                    reason = "length" if len(self.script) >= sampling.max_tokens else "stop"
                logprobs = None
                if sampling.logprobs is not None:
                    logprobs = [{tid: -0.25, (tid + 1) % 49152: -1.5}]
                outputs = [
                    OutputDelta(index=j, text=text, token_ids=[tid], logprobs=logprobs, finish_reason=reason)
                    for j in range(sampling.n)
                ]
                update = GenerationUpdate(
                    request_id=request_id, prompt_token_ids=prompt_ids, outputs=outputs, finished=last
                )
                if last and capture is not None:
                    generated = [t for t, _ in steps]
                    update.captures = _fake_captures(capture, self._saes, prompt_ids, generated)
                if last and steering:
                    update.steering_report = _report(
                        steering, _fake_rows(steering, len(prompt_ids), len(steps), sampling.n), len(steps) > 1
                    )
                finished = last
                yield update
        finally:
            self.active.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def health(self) -> None:
        async for _ in self.generate([1], Sampling(max_tokens=1, temperature=0.0)):
            pass


def _fake_rows(steering: list[SteeringEntry], n_prompt: int, n_generated: int, n: int) -> dict:
    """The worker's count of token rows steered per entry: prefill rows for `prompt`, decode rows (every generated
    token but the last is read back) for `generated`, per choice."""
    decode = max(n_generated - 1, 0)
    per = {"prompt": n_prompt, "generated": decode, "all": n_prompt + decode}
    return {"rows": {i: per[e.positions] * n for i, e in enumerate(steering)}, "missing": [], "over_capacity": []}


def _fake_captures(
    capture: CaptureSpec, saes: dict[str, SAEMeta], prompt: list[int], generated: list[int]
) -> dict[str, dict[str, list]]:
    """Captures in the worker's layout: per SAE, positions read and per position top and selected feature values.
    The last generated token is never read by the model, so it has no row."""
    n_positions = len(prompt) + (max(len(generated) - 1, 0) if capture.include_generated else 0)
    out = {}
    for sae_id in capture.saes:
        d_sae = saes[sae_id].d_sae
        k = min(capture.top_k, d_sae)
        rows = range(n_positions)
        out[sae_id] = {
            "positions": list(rows),
            "top_indices": [[(p + j) % d_sae for j in range(k)] for p in rows],
            "top_values": [[float(k - j) for j in range(k)] for p in rows],
            "feature_values": [[0.5 for _ in capture.features.get(sae_id, [])] for p in rows],
        }
    return out


# --- the SAE directory behind a fake Ray handle ----------------------------------------------------------------------


class DirectoryUnreachable(RuntimeError):
    """What a handle call raises while the fake directory is unreachable (as a Ray actor error would)."""


class _Method:
    def __init__(self, handle: FakeDirectoryHandle, name: str):
        self._handle = handle
        self._name = name

    def remote(self, *args, **kwargs):
        return self._handle._call(self._name, args, kwargs)


class FakeDirectoryHandle:
    """`handle.method.remote(*args)` -> awaitable result of `directory.method(*args)`.

    One handle per replica over a shared `SAEDirectory`, like Ray Serve handles of one deployment. Switches:
    `unreachable` (every call raises DirectoryUnreachable) and `drop_puts` (that many next `put` calls are lost on
    the way: the directory never records them and the caller's call raises, as a Ray call to a replica that died
    before answering would).
    """

    def __init__(self, directory: SAEDirectory):
        self.directory = directory
        self.unreachable = False
        self.drop_puts = 0

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_") or not callable(getattr(SAEDirectory, name, None)):
            raise AttributeError(name)
        return _Method(self, name)

    async def _call(self, name: str, args: tuple, kwargs: dict):
        await asyncio.sleep(0)  # a hop: other tasks run meanwhile, as across Ray
        if self.unreachable:
            raise DirectoryUnreachable(f"SAEDirectory.{name}: unreachable")
        if name == "put" and self.drop_puts:
            self.drop_puts -= 1
            raise DirectoryUnreachable("SAEDirectory.put: lost")
        args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
        result = getattr(self.directory, name)(*args, **kwargs)
        return pickle.loads(pickle.dumps(result))
