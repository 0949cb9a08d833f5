"""The SAE engine API: one vLLM AsyncLLM with SAE hook points, steering and capture.

The only module of the project that talks to vLLM's engine; the Ray Serve deployment owns one `SAEEngine`.
Specs are validated here (and only here), before a request reaches vLLM, so a bad spec never occupies a batch
slot. vLLM's engine-dead errors become `EngineUnavailable` here, the one place that classifies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.engine import codec
from serve.engine.config import EngineConfig
from serve.engine.live import LiveFeatures, LiveToken
from serve.engine.residency import Residency
from serve.errors import EngineUnavailable, SpecError, SteeringUnavailable, Unavailable
from serve.specs import (
    MAX_CONDITIONS,
    CaptureSpec,
    ReportStatus,
    SAEMeta,
    SteeringEntry,
    SteeringReport,
    known_feature,
    steering_cache_salt,
    validate_capture,
    validate_steering,
)

if TYPE_CHECKING:
    from sae import SparseAutoencoder

logger = logging.getLogger("sae_serve")

# The start-up probe: a short greedy generation with and without a strong `add` on generated positions only. The
# first token comes from the (unsteered) prefill, so any difference after it is made on decode steps.
PROBE_PROMPT = [1, 2, 3, 4]
PROBE_TOKENS = 6


@dataclass(frozen=True)
class Sampling:
    """Sampling options of one request, engine-side (the API layer maps OpenAI fields onto it)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None  # top logprobs per generated token
    prompt_logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class OutputDelta:
    """New tokens of one of the n sequences since the last update."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per new token: token id -> logprob (sampled one included)
    finish_reason: str | None


@dataclass
class GenerationUpdate:
    """One step of a generation stream; the final update of a steering request carries its `steering_report`,
    that of a capture request its `captures`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[OutputDelta]
    finished: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None
    captures: dict[str, dict[str, list]] | None = None
    steering_report: list[SteeringReport] | None = None
    live: list[LiveToken] | None = None  # live features: the rows of exactly the tokens this update delivers


@dataclass
class ActivationsResult:
    """Per-token SAE features of a text; rows follow `token_ids` (prompt, then generated if asked)."""

    token_ids: list[int]
    num_prompt_tokens: int
    generated_text: str
    per_sae: dict[str, dict[str, list]] = field(default_factory=dict)


@contextlib.contextmanager
def _engine_down_errors() -> Iterator[None]:
    """vLLM's engine-dead error, raised as the service's EngineUnavailable."""
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except EngineDeadError:
        raise EngineUnavailable() from None


class SAEEngine:
    """Async facade over vLLM's AsyncLLM; create with `await SAEEngine.start(config)`."""

    def __init__(self, config: EngineConfig, llm, model_dir: Path, dims: dict):
        self.config = config
        self.model_dir = model_dir
        self.d_model: int = dims["d_model"]
        self.n_layers: int = dims["n_layers"]
        self.static_steering: bool = dims["static_steering"]  # the workers steer inside captured CUDA graphs
        self.sae_dtype: str = dims["sae_dtype"]  # torch dtype name the workers hold SAE weights in
        budget = None if config.sae_memory_gib is None else int(config.sae_memory_gib * (1 << 30))
        self._residency = Residency(budget, self._page, config.residency_wait_s)
        self._llm = llm
        self._saes: dict[str, SAEMeta] = {}
        self._sae_lock = asyncio.Lock()
        self._probed_sites: set[str] = set()
        self.steering_refused: str | None = None  # why steering requests are refused, once a probe failed
        self._live: dict[str, asyncio.Queue] = {}  # request key -> inbox of a running live-features request
        self._drain_wake = asyncio.Event()  # set by every engine output of a live-features request
        self._drain_task: asyncio.Task | None = None
        self._draining: asyncio.Task | None = None  # the drain in flight

    @classmethod
    async def start(cls, config: EngineConfig) -> SAEEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from serve.engine.model_files import resolve_model
        from serve.engine.worker.plugin import MODEL_ARCH

        phases = _Phases()
        model_dir = resolve_model(config.model)
        phases.done("model files")
        # Read by vLLM in the engine core process it starts below (the environment is inherited).
        os.environ["VLLM_USE_AOT_COMPILE"] = "1" if config.aot_compile else "0"
        _bind_cpu_workers(config.tensor_parallel_size * config.pipeline_parallel_size)
        optional: dict[str, Any] = {}  # vLLM's own default where the config leaves a field unset
        if config.gpu_memory_utilization is not None:
            optional["gpu_memory_utilization"] = config.gpu_memory_utilization
        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=config.dtype,  # type: ignore[arg-type]  # validated by vLLM
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            kv_cache_memory_bytes=int(config.kv_cache_gib * (1 << 30)),
            enable_prefix_caching=config.enable_prefix_caching,
            hf_overrides={"architectures": [MODEL_ARCH]},
            worker_extension_cls="serve.engine.worker.extension.SAEWorkerExtension",
            load_format="dummy" if config.load_dummy_weights else "auto",
            seed=config.seed,
            disable_log_stats=True,
            tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size,
            distributed_executor_backend=config.distributed_executor_backend,
            additional_config=codec.WorkerOptions(
                static_steering=config.static_steering,
                steering_slots=config.steering_slots,
                capture_sites=config.capture_sites,
                sae_dtype=config.sae_dtype,
                condition_slots=config.condition_slots,
                conditions_per_entry=MAX_CONDITIONS,
            ).to_additional_config(),
            **optional,
        )
        llm = AsyncLLM.from_engine_args(args)
        try:
            phases.done("vLLM engine (weights, compile, KV cache)")
            dims = (await llm.collective_rpc("sae_attach"))[0]
            engine = cls(config, llm, model_dir, dims)
            for sae_id, path in config.saes.items():
                await engine.load_sae(path, sae_id)
            if config.saes:
                phases.done(f"{len(config.saes)} SAE(s) loaded and probed")
        except BaseException:
            llm.shutdown()
            raise
        logger.info("engine started: %s", phases)
        return engine

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, config: EngineConfig) -> AsyncIterator[SAEEngine]:
        """`async with SAEEngine.started(config) as engine:` — the engine is shut down on every way out."""
        engine = await cls.start(config)
        try:
            yield engine
        finally:
            engine.shutdown()

    @property
    def tokenizer(self):
        return self._llm.get_tokenizer()

    @property
    def running(self) -> bool:
        """False once shut down or once vLLM's engine core died (a cheap probe for Ray Serve's health check)."""
        return self._llm is not None and not self._llm.errored

    def _check_running(self) -> None:
        if self._llm is None or self._llm.errored:
            raise EngineUnavailable()

    # --- SAEs ---------------------------------------------------------------------------------------
    def saes(self) -> list[SAEMeta]:
        return [dataclasses.replace(m, resident=self._residency.is_resident(s)) for s, m in self._saes.items()]

    @property
    def page_ins(self) -> int:
        """SAEs paged in from host memory since start (not counting loads)."""
        return self._residency.page_ins

    async def _page(self, page_in: list[str], page_out: list[str]) -> None:
        with _engine_down_errors():
            await self._llm.collective_rpc("sae_page", args=(page_in, page_out))

    async def load_sae(self, path: str | Path, sae_id: str | None = None) -> SAEMeta:
        """Validate in the driver, then load on every worker; a bad SAE raises and changes nothing."""
        self._check_running()
        path = Path(path)
        module, meta = read_sae(path, sae_id or path.name, self.d_model, self.n_layers)
        sae_id = meta.sae_id
        self._residency.check_fits(sae_id, _folded_bytes(module, self.sae_dtype))
        async with self._sae_lock:
            with _engine_down_errors():
                loaded = await self._llm.collective_rpc("sae_load", args=(sae_id, str(path)))
            meta = dataclasses.replace(meta, resident_bytes=int(loaded[0]["bytes"]))
            self._saes[sae_id] = meta
            await self._residency.added(sae_id, meta.resident_bytes)
        if self.config.probe_steering and meta.hook_point not in self._probed_sites:
            self._probed_sites.add(meta.hook_point)
            await self._probe(meta, int(module.W_dec.norm(dim=1).argmax()))
        return meta

    async def _probe(self, meta: SAEMeta, feature: int) -> None:
        """Prove that steering at this SAE's hook point changes decode steps, or refuse steering from now on."""
        sampling = Sampling(max_tokens=PROBE_TOKENS, temperature=0.0, ignore_eos=True)
        entry = SteeringEntry(
            sae=meta.sae_id, feature=feature, value=self.config.max_abs_steering_value, positions="generated"
        )
        plain, steered = [await self._greedy_tokens(sampling, steer) for steer in ([], [entry])]
        if plain[1:] != steered[1:]:
            logger.info("steering probe at %s passed: decode steps follow the steering", meta.hook_point)
            return
        self.steering_refused = (
            f"steering is refused on this engine: at start-up, an add of {entry.value:g} on feature {feature} of "
            f"{meta.sae_id!r} ({meta.hook_point}) did not change any decode step, so steered requests would run "
            f"unsteered; plain generation is still served. Check that the SAE hook op runs at every step (e.g. not "
            f"captured inside a CUDA graph) and restart"
        )
        logger.error("%s", self.steering_refused)

    async def _greedy_tokens(self, sampling: Sampling, steering: list[SteeringEntry]) -> list[int]:
        tokens: list[int] = []
        async for update in self._generate(PROBE_PROMPT, sampling, steering, None):
            for out in update.outputs:
                tokens += out.token_ids
        return tokens

    async def unload_sae(self, sae_id: str) -> None:
        self._check_running()
        async with self._sae_lock:
            if sae_id not in self._saes:
                raise KeyError(sae_id)
            del self._saes[sae_id]
            await self._residency.removed(sae_id)
            with _engine_down_errors():
                await self._llm.collective_rpc("sae_unload", args=(sae_id,))

    # --- generation ---------------------------------------------------------------------------------
    def _check_specs(
        self, steering: list[SteeringEntry], capture: CaptureSpec | None = None, n: int = 1, live: bool = False
    ) -> None:
        if steering and self.steering_refused is not None:
            raise SteeringUnavailable(self.steering_refused, "steering")
        if len(steering) > self.config.max_steering_entries:
            raise SpecError(f"steering: at most {self.config.max_steering_entries} entries", "steering")
        validate_steering(steering, self._saes, self.config.max_abs_steering_value, self.static_steering)
        for i, e in enumerate(steering):
            if e.vector is not None:
                _check_vector(i, e, self.d_model, self.n_layers)
            _check_conditions(i, e, self._saes, self.static_steering, self.config.pipeline_parallel_size > 1)
        if capture is not None:
            if n != 1:
                what = "live features (sae_features) need" if live else "feature capture needs"
                raise SpecError(f"n: {what} n == 1", "n")
            validate_capture(capture, self._saes, self.config.capture_sites, "sae_features." if live else "")

    async def generate(
        self,
        prompt: str | list[int],
        sampling: Sampling,
        steering: Sequence[SteeringEntry] = (),
        capture: CaptureSpec | None = None,
        request_id: str | None = None,
        live: bool = False,
    ) -> AsyncIterator[GenerationUpdate]:
        """Stream deltas; raises SpecError before anything is queued if a spec is invalid. `live`: the captured
        rows come on the updates as they are read (`GenerationUpdate.live`), not all at the end."""
        steering = list(steering)
        self._check_running()
        self._check_specs(steering, capture, sampling.n, live)
        async for update in self._generate(prompt, sampling, steering, capture, request_id, live):
            yield update

    async def _generate(
        self,
        prompt: str | list[int],
        sampling: Sampling,
        steering: list[SteeringEntry],
        capture: CaptureSpec | None,
        request_id: str | None = None,
        live: bool = False,
    ) -> AsyncIterator[GenerationUpdate]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        request_id = request_id or uuid.uuid4().hex
        key = uuid.uuid4().hex  # files the worker's report and captures of this request
        extra = codec.encode(steering, capture, key)
        params = SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            logprobs=sampling.logprobs,
            prompt_logprobs=sampling.prompt_logprobs,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra or None,
        )
        engine_prompt: dict = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        # Capture must compute every prompt position, so it never reads cached KV; steered KV is salted per spec.
        reads_prompt = capture is not None and capture.include_prompt
        salt = f"capture-{key}" if reads_prompt else steering_cache_salt(steering, self._saes)
        if salt:
            engine_prompt["cache_salt"] = salt
        sae_ids = [e.sae for e in steering if e.sae is not None] + [c.sae for e in steering for c in e.when]
        sae_ids += list(capture.saes) if capture else []
        run = (
            self._run_live(engine_prompt, params, request_id, key, steering, capture, sampling)
            if live and capture is not None
            else self._run(engine_prompt, params, request_id, key, extra, steering, capture, sampling)
        )
        async with self._residency.reserve(sae_ids), contextlib.aclosing(run):
            async for update in run:
                yield update

    async def _run(
        self,
        engine_prompt: dict,
        params: Any,
        request_id: str,
        key: str,
        extra: dict,
        steering: list[SteeringEntry],
        capture: CaptureSpec | None,
        sampling: Sampling,
    ) -> AsyncGenerator[GenerationUpdate]:
        """One request in vLLM, with its SAEs resident: deltas, then what the workers left for it."""
        finished = False
        generated = 0
        try:
            with _engine_down_errors():
                async for out in self._llm.generate(engine_prompt, params, request_id):
                    finished = out.finished
                    update = _to_update(request_id, out)
                    generated += sum(len(o.token_ids) for o in update.outputs)
                    if finished and extra:
                        left = _merge_ranks(await self._llm.collective_rpc("sae_finish", args=(key,)))
                        if capture is not None:
                            if left["capture_error"]:
                                raise Unavailable(f"feature capture failed: {left['capture_error']}; retry")
                            update.captures = left["captures"]
                        if steering:
                            update.steering_report = _report(steering, left["report"], generated > sampling.n)
                    yield update
        finally:
            if not finished:
                with _engine_down_errors():
                    await self._llm.abort(request_id)
                    if extra:
                        await self._llm.collective_rpc("sae_finish", args=(key,))

    async def _run_live(
        self,
        engine_prompt: dict,
        params: Any,
        request_id: str,
        key: str,
        steering: list[SteeringEntry],
        capture: CaptureSpec,
        sampling: Sampling,
    ) -> AsyncGenerator[GenerationUpdate]:
        """One live-features request: engine outputs and drained rows meet in its inbox; an output goes out once its
        tokens' rows are in (`LiveFeatures`), the rest when the request ends."""
        inbox: asyncio.Queue = asyncio.Queue()
        features = LiveFeatures(capture.saes, capture.include_prompt)

        async def pump() -> None:
            try:
                with _engine_down_errors():
                    async for out in self._llm.generate(engine_prompt, params, request_id):
                        inbox.put_nowait(("out", out))
                        self._drain_wake.set()
                inbox.put_nowait(("end", None))
            except Exception as e:  # handed to the consumer, which raises it
                inbox.put_nowait(("error", e))

        self._live[key] = inbox
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain_forever())
        reader = asyncio.create_task(pump())
        finished = False
        generated = 0
        try:
            while True:
                kind, value = await inbox.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    break
                if kind == "rows":
                    features.add_rows(value)
                else:
                    update = _to_update(request_id, value)
                    generated += sum(len(o.token_ids) for o in update.outputs)
                    features.add(update)
                for update in features.ready():
                    yield update
            finished = True
            del self._live[key]
            if self._draining is not None:  # rows of this request may be on their way
                await asyncio.shield(self._draining)
            while not inbox.empty():
                kind, value = inbox.get_nowait()
                if kind == "rows":
                    features.add_rows(value)
            with _engine_down_errors():
                left = _merge_ranks(await self._llm.collective_rpc("sae_finish", args=(key,)))
            if left["capture_error"]:
                raise Unavailable(f"live features failed: {left['capture_error']}; retry")
            features.add_rows(left["captures"])
            last = features.ready(final=True)
            if steering and last:
                last[-1].steering_report = _report(steering, left["report"], generated > sampling.n)
            for update in last:
                yield update
        finally:
            self._live.pop(key, None)
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            if not finished:
                with _engine_down_errors():
                    await self._llm.abort(request_id)
                    await self._llm.collective_rpc("sae_finish", args=(key,))

    async def _drain_forever(self) -> None:
        """While live-features requests run: after each batch of engine outputs, one call to all workers for the rows
        encoded since the last drain of every live request (never one call per request or token)."""
        while True:
            await self._drain_wake.wait()
            self._drain_wake.clear()
            if not self._live:
                continue
            self._draining = asyncio.create_task(self._drain_once(dict(self._live)))
            try:
                await self._draining
            except Exception as e:  # the engine died: every live request fails with it
                for inbox in self._live.values():
                    inbox.put_nowait(("error", e))
            finally:
                self._draining = None

    async def _drain_once(self, inboxes: dict[str, asyncio.Queue]) -> None:
        """One drain for the requests live when it started: their rows reach their inboxes even if they end meanwhile
        (an ending request waits for this drain before its last call)."""
        with _engine_down_errors():
            per_rank = await self._llm.collective_rpc("sae_drain", args=(list(inboxes),))
        for key, captures in _merge_ranks_rows(per_rank).items():
            inboxes[key].put_nowait(("rows", captures))

    async def activations(
        self,
        prompt: str | list[int],
        capture: CaptureSpec,
        steering: Sequence[SteeringEntry] = (),
        sampling: Sampling | None = None,
    ) -> ActivationsResult:
        """Per-token features of the prompt (and of generated tokens when `sampling` asks for a continuation)."""
        sampling = sampling or Sampling(max_tokens=1, temperature=0.0)
        prompt_ids: list[int] = []
        generated: list[int] = []
        text: list[str] = []
        captures: dict = {}
        async for update in self.generate(prompt, sampling, steering, capture):
            prompt_ids = update.prompt_token_ids
            for o in update.outputs:
                generated += o.token_ids
                text.append(o.text)
            if update.captures is not None:
                captures = update.captures
        keep_generated = capture.include_generated and sampling.max_tokens > 1
        ids = prompt_ids + (generated if keep_generated else [])
        return ActivationsResult(
            token_ids=ids,
            num_prompt_tokens=len(prompt_ids),
            generated_text="".join(text) if keep_generated else "",
            per_sae=captures,
        )

    async def health(self) -> None:
        """Raise unless the engine answers a one-token generation."""
        async for _ in self.generate([1], Sampling(max_tokens=1, temperature=0.0)):
            pass

    def shutdown(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def _to_update(request_id: str, out) -> GenerationUpdate:
    outputs = [
        OutputDelta(
            index=c.index,
            text=c.text,
            token_ids=list(c.token_ids),
            logprobs=[{t: lp.logprob for t, lp in pos.items()} for pos in c.logprobs]
            if c.logprobs is not None
            else None,
            finish_reason=c.finish_reason,
        )
        for c in out.outputs
    ]
    prompt_lp = None
    if out.prompt_logprobs is not None:
        prompt_lp = [None if p is None else {t: lp.logprob for t, lp in p.items()} for p in out.prompt_logprobs]
    return GenerationUpdate(
        request_id=request_id,
        prompt_token_ids=list(out.prompt_token_ids or []),
        outputs=outputs,
        finished=out.finished,
        prompt_logprobs=prompt_lp,
    )


def _bind_cpu_workers(world_size: int) -> None:
    """On a CPU host vLLM binds each TP x PP worker's OpenMP threads to a NUMA node of its own and refuses more
    workers than nodes; on a one-node machine give each worker its share of the allowed cores instead (an explicit
    VLLM_CPU_OMP_THREADS_BIND wins)."""
    import torch

    if world_size == 1 or torch.cuda.is_available() or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world_size:
        raise ValueError(
            f"{world_size} CPU engine workers (tensor x pipeline parallel) need at least {world_size} "
            f"cores; this process may use {len(cpus)}"
        )
    share = len(cpus) // world_size
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(str(c) for c in cpus[r * share : (r + 1) * share]) for r in range(world_size)
    )


def _merge_ranks(per_rank: list[dict]) -> dict:
    """One request's leftovers from every worker: tensor-parallel ranks hold the same rows, a pipeline-parallel rank
    only those of the layers it owns, so each SAE's captures come from the first rank that has them. Every rank
    plans the same steering rows: the first rank's report stands for all."""
    captures: dict = {}
    for left in per_rank:
        for sae_id, rows in left["captures"].items():
            captures.setdefault(sae_id, rows)
    error = next((left["capture_error"] for left in per_rank if left["capture_error"]), None)
    return {"captures": captures, "capture_error": error, "report": per_rank[0]["report"]}


def _merge_ranks_rows(per_rank: list[dict[str, dict]]) -> dict[str, dict]:
    """Drained rows per request key from every worker; as in `_merge_ranks`, each SAE's from the first rank with it."""
    out: dict[str, dict] = {}
    for drained in per_rank:
        for key, captures in drained.items():
            for sae_id, rows in captures.items():
                out.setdefault(key, {}).setdefault(sae_id, rows)
    return out


class _Phases:
    """Wall time of each start-up phase, for the start-up log line."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._parts: list[str] = []

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self._parts.append(f"{name} {now - self._last:.1f} s")
        self._last = now

    def __str__(self) -> str:
        return "; ".join(self._parts)


def _report(steering: list[SteeringEntry], worker: dict, decoded: bool) -> list[SteeringReport]:
    """Each entry's steered rows (the worker counts them per entry index) and its status. `decoded`: the request
    ran at least one decode step, so `generated` entries had tokens to steer."""
    rows: dict[int, int] = worker["rows"]
    missing = set(worker["missing"])
    left_out = set(worker["over_capacity"])
    out = []
    status: ReportStatus
    for i, e in enumerate(steering):
        steered = int(rows.get(i, 0))
        if i in missing:
            status = "sae_not_loaded"
        elif i in left_out:
            status = "over_capacity"
        elif steered:
            status = "applied"
        elif e.when:
            status = "condition_not_met"
        elif e.positions != "generated" or decoded:
            status = "not_applied"
        else:
            status = "no_tokens"
        if status in ("not_applied", "sae_not_loaded", "over_capacity"):
            logger.error("steering[%d] (%s): %s, %d token(s) steered", i, e.label(), status, steered)
        out.append(SteeringReport(index=i, sae=e.sae, feature=e.feature, steered_tokens=steered, status=status))
    return out


def _check_conditions(i: int, e: SteeringEntry, saes: dict[str, SAEMeta], static: bool, pipelined: bool) -> None:
    """Each condition's SAE is loaded, its feature in range, and its hook point at or before the entry's (a
    condition is read before its own site's steering, so the same site is allowed); with pipeline stages, in the
    entry's layer (a condition's result does not travel between stages)."""
    from sae.hookpoints import SITES, HookPoint

    def order(hook_point: str) -> tuple[int, int]:
        hp = HookPoint.parse(hook_point)
        return hp.layer, SITES.index(hp.site)

    target = e.hook_point if e.vector is not None else saes[e.sae or ""].hook_point
    for j, c in enumerate(e.when):
        field = f"steering[{i}].when[{j}]"
        meta = known_feature(saes, c.sae, c.feature, field)
        if order(meta.hook_point) > order(target or ""):
            raise SpecError(
                f"{field}.sae: {c.sae!r} reads {meta.hook_point}, after the entry's {target}: a condition must be "
                f"computed before the steering it gates",
                f"{field}.sae",
            )
        if pipelined and order(meta.hook_point)[0] != order(target or "")[0]:
            raise SpecError(
                f"{field}.sae: with pipeline_parallel_size > 1 a condition must read the entry's own layer",
                f"{field}.sae",
            )
        if static and meta.architecture == "topk":
            raise SpecError(
                f"{field}.sae: a condition on a TopK SAE needs a full encode of every row, which this engine does "
                f"not run inside its CUDA graphs; use a ReLU or JumpReLU SAE, or an engine with enforce_eager: true",
                f"{field}.sae",
            )


def _check_vector(i: int, e: SteeringEntry, d_model: int, n_layers: int) -> None:
    """A vector entry against the model: a hook point inside it, d_model values, a direction where the op needs one."""
    from sae.hookpoints import HookPoint

    assert e.vector is not None and e.hook_point is not None
    try:
        hp = HookPoint.parse(e.hook_point)
    except ValueError as err:
        raise SpecError(f"steering[{i}].hook_point: {err}", f"steering[{i}].hook_point") from None
    if not 0 <= hp.layer < n_layers:
        raise SpecError(
            f"steering[{i}].hook_point: layer {hp.layer} outside the model's {n_layers} layers",
            f"steering[{i}].hook_point",
        )
    if len(e.vector) != d_model:
        raise SpecError(
            f"steering[{i}].vector: {len(e.vector)} values, the model's d_model is {d_model}", f"steering[{i}].vector"
        )
    if (e.op != "add" or e.normalize) and not any(e.vector):
        raise SpecError(f"steering[{i}].vector: all zeros has no direction to {e.op} along", f"steering[{i}].vector")


def _folded_bytes(module: SparseAutoencoder, dtype: str) -> int:
    import torch

    from sae.steering import FoldedSAE

    return FoldedSAE.bytes_for(module, getattr(torch, dtype))


def read_sae(path: Path, sae_id: str, d_model: int, n_layers: int) -> tuple[SparseAutoencoder, SAEMeta]:
    """The SAE module and its metadata, read and checked (shapes, finite values, fit to the model) before any
    worker is touched; raises for a bad folder."""
    from sae import load_sae, validate_for_model

    module = load_sae(path)
    validate_for_model(module.cfg, d_model, n_layers)
    meta = SAEMeta(
        sae_id=sae_id,
        hook_point=module.cfg.hook_point,
        d_in=module.cfg.d_in,
        d_sae=module.cfg.d_sae,
        architecture=module.cfg.architecture,
        version=_weights_digest(path),
    )
    return module, meta


def _weights_digest(folder: Path) -> str:
    """Cheap version tag of an SAE folder: size and mtime of its files (the salt must change when weights do)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
