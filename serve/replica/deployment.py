"""The model deployment: one engine per replica, plus what needs the tokenizer or SAE weights.

Methods take the wire protocol's request models as the ingress parsed them and answer with its response models;
expected failures are raised as `serve.errors` exceptions, which Ray carries to the ingress as themselves. The
class is plain: `serve.launch.app.build_app` turns it into a Ray Serve deployment and gives it the engine factory,
so unit tests run it against a fake engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from serve.config import ServiceConfig
from serve.engine.config import EngineConfig
from serve.engine.engine import GenerationUpdate, Sampling
from serve.errors import ContextLengthExceeded, NotFound
from serve.protocol import (
    ActivationsRequest,
    ActivationsResponse,
    ChatCompletionRequest,
    ChoiceDelta,
    FeatureCard,
    FeatureList,
    GenerationRequest,
    SAECard,
    SAEInfo,
    StreamItem,
    TokenLogprob,
    Usage,
)
from serve.registry import CARD_FILE, FEATURE_STATS_FILE, read_json
from serve.replica.activations import activation_rows
from serve.replica.feature_lens import FeatureLens
from serve.replica.feature_search import search
from serve.replica.live_rows import LiveRows
from serve.replica.prompting import PromptRenderer, RenderedPrompt
from serve.replica.registry_watcher import ManifestWatcher
from serve.replica.sae_set import SAESet, sae_info_fields
from serve.replica.stream_batch import batched
from serve.specs import CaptureSpec

EngineFactory = Callable[[EngineConfig], Awaitable[Any]]


async def start_vllm_engine(config: EngineConfig):
    """The production engine factory: one vLLM AsyncLLM with the SAE worker extension."""
    from serve.engine.engine import SAEEngine

    return await SAEEngine.start(config)


def sampling_for(req: GenerationRequest, max_tokens: int) -> Sampling:
    """The one conversion of a completion or chat request's sampling fields into the engine's."""
    return Sampling(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop_tuple(),
        n=req.n,
        logprobs=req.top_logprobs_count(),
    )


def _log_to_stderr() -> None:
    """The service's own log lines (engine start-up phases, loads, rejections) on this replica's stderr, which Ray
    forwards to the driver's console."""
    log = logging.getLogger("sae_serve")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("sae-serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class SAEModel:
    """Owns one engine; converges on the SAE directory's set (see serve/replica/sae_set.py)."""

    async def __init__(self, config: dict, directory, engine_factory: EngineFactory = start_vllm_engine):
        import torch

        torch.set_num_threads(1)  # only feature cards compute here; the engine's worker has its own process
        _log_to_stderr()
        self.config = ServiceConfig.model_validate(config)
        # SAEs come from the directory, so that every replica serves the same set.
        self._engine = await engine_factory(self.config.engine.model_copy(update={"saes": {}}))
        self._prompts = PromptRenderer(self._engine.model_dir)
        self._lens = FeatureLens(self._engine.model_dir)
        self._saes = SAESet(self._engine, directory, self.config.sae_registry)
        self._streams = 0  # generations streaming from this replica now
        await self._saes.sync()
        self._sync_task = asyncio.create_task(self._saes.sync_forever(self.config.sae_sync_interval_s))
        self._watch_task = None
        if self.config.watch_registry and self.config.sae_registry is not None:
            watcher = ManifestWatcher(self.config.sae_registry)
            self._watch_task = asyncio.create_task(
                self._saes.watch_registry(watcher, self.config.registry_poll_interval_s)
            )

    # --- SAEs ------------------------------------------------------------------------------------------------------
    async def saes(self, version: int = 0) -> list[SAEInfo]:
        await self._saes.catch_up(version)
        return [SAEInfo(**sae_info_fields(m)) for m in sorted(self._engine.saes(), key=lambda m: m.sae_id)]

    async def sae_card(self, sae_id: str, version: int = 0) -> SAECard:
        meta, folder = await self._saes.served(sae_id, version)
        cfg = await asyncio.to_thread(self._lens.config, sae_id, meta.version, folder)
        return SAECard(
            **sae_info_fields(meta),
            model=cfg.model,
            k=cfg.k,
            metadata=cfg.metadata,
            card=read_json(folder / CARD_FILE),
            has_feature_stats=(folder / FEATURE_STATS_FILE).is_file(),
        )

    async def feature(self, sae_id: str, index: int, top_n: int, version: int = 0) -> FeatureCard:
        meta, folder = await self._saes.served(sae_id, version)
        if not 0 <= index < meta.d_sae:
            raise NotFound(
                f"feature {index} out of range for SAE {sae_id!r} with {meta.d_sae} features",
                "feature",
                "feature_not_found",
            )
        card = await asyncio.to_thread(
            self._lens.card, sae_id, meta.version, folder, index, top_n, self._prompts.token_text
        )
        return FeatureCard(**card)

    async def feature_list(self, sae_id: str, query: str, limit: int, offset: int, version: int = 0) -> FeatureList:
        """Feature summaries matching `query` (see serve/replica/feature_search.py), one page."""
        meta, folder = await self._saes.served(sae_id, version)
        records = await asyncio.to_thread(self._lens.stats, sae_id, meta.version, folder)
        return FeatureList(sae=sae_id, **search(records, meta.d_sae, query, limit, offset))

    async def sae_plot(self, sae_id: str, name: str, version: int = 0) -> bytes:
        """A PNG the trainer wrote beside the SAE; only files its card lists under files.plots are served."""
        _, folder = await self._saes.served(sae_id, version)
        plots = ((read_json(folder / CARD_FILE) or {}).get("files") or {}).get("plots") or []
        if name not in plots or not (folder / name).is_file():
            raise NotFound(f"SAE {sae_id!r} has no plot {name!r}", "name", "plot_not_found")
        return await asyncio.to_thread((folder / name).read_bytes)

    async def load_sae(self, path: str, sae_id: str | None) -> tuple[SAEInfo, int]:
        """Load here, then publish to the directory; returns the SAE and the directory's new version."""
        meta, version = await self._saes.load(path, sae_id)
        return SAEInfo(**sae_info_fields(meta)), version

    async def unload_sae(self, sae_id: str) -> int:
        return await self._saes.unload(sae_id)

    async def registry_status(self):
        return await self._saes.registry_status(self._watch_task is not None)

    # --- prompts ---------------------------------------------------------------------------------------------------
    def _render(self, req: GenerationRequest | ActivationsRequest) -> tuple[RenderedPrompt, str]:
        """Token ids of the request's prompt, and the name of the field it came from."""
        if isinstance(req, ChatCompletionRequest):
            param = "messages"
            rendered = self._prompts.render_chat([m.template_dict() for m in req.messages], True, param)
        elif isinstance(req, ActivationsRequest):
            if req.messages is not None:
                param = "messages"
                rendered = self._prompts.render_chat(
                    [m.template_dict() for m in req.messages], req.add_generation_prompt, param
                )
            else:
                param = "input"
                rendered = self._prompts.render_text(req.input or "", param)
        else:
            param = "prompt"
            prompt = req.prompt
            rendered = (
                self._prompts.render_text(prompt, param)
                if isinstance(prompt, str)
                else self._prompts.render_ids(prompt, param)
            )  # type: ignore[arg-type]
        limit = self.config.limits.max_prompt_tokens
        if len(rendered.token_ids) > limit:
            raise ContextLengthExceeded(
                f"{param}: the prompt has {len(rendered.token_ids)} tokens; the limit is {limit}", param
            )
        return rendered, param

    def _fit(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        room = self.config.engine.max_model_len - prompt_len
        if max_tokens is None:
            if room < 1:
                raise ContextLengthExceeded(
                    f"the prompt ({prompt_len} tokens) fills the model's context "
                    f"({self.config.engine.max_model_len} tokens)"
                )
            return min(room, self.config.limits.max_tokens)
        if max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.config.engine.max_model_len} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param,
            )
        return max_tokens

    # --- generation ------------------------------------------------------------------------------------------------
    async def generate(self, req: GenerationRequest, sae_version: int) -> AsyncIterator[StreamItem]:
        """Stream of StreamItems; an invalid request raises before the first item."""
        live = req.sae_features
        wanted = {e.sae for e in req.steering if e.sae} | set(live.saes if live else ())
        await self._saes.catch_up(sae_version, wanted)
        rendered, _ = self._render(req)
        max_tokens = self._fit(len(rendered.token_ids), req.output_limit(), req.max_tokens_param())
        top_n = req.top_logprobs_count()
        sampling = sampling_for(req, max_tokens)
        rows = None
        if live is None:
            updates = self._engine.generate(rendered.token_ids, sampling, req.steering)
        else:
            capture = CaptureSpec(
                saes=live.saes,
                top_k=live.top_k,
                features=live.features,
                include_generated=True,
                include_prompt=live.include_prompt,
            )
            updates = self._engine.generate(rendered.token_ids, sampling, req.steering, capture, live=True)
            rows = LiveRows(self._prompts, rendered, live)
        self._streams += 1
        try:
            async for group in batched(updates, self._stream_window if req.stream else None):
                yield self._item(group, len(rendered.token_ids), top_n, rows)
        finally:
            self._streams -= 1

    def _stream_window(self) -> float:
        """Seconds to merge a stream's deltas: each message costs CPU in every process it crosses (this replica,
        the ingress, Ray's proxy if in front), so with many streams the windows widen to bound the replica's
        message rate."""
        return max(self.config.stream_batch_ms / 1000, self._streams / self.config.stream_messages_per_s)

    def _item(
        self, group: list[GenerationUpdate], prompt_tokens: int, top_n: int | None, rows: LiveRows | None = None
    ) -> StreamItem:
        deltas: dict[int, ChoiceDelta] = {}
        for update in group:
            if rows is not None and update.live is not None:  # n == 1: all on choice 0
                d = deltas.setdefault(0, ChoiceDelta(0, "", 0, [] if top_n is not None else None, None))
                d.features = (d.features or []) + rows.rows(update.live, "".join(o.text for o in update.outputs))
            for out in update.outputs:
                d = deltas.setdefault(out.index, ChoiceDelta(out.index, "", 0, [] if top_n is not None else None, None))
                d.text += out.text
                d.num_tokens += len(out.token_ids)
                if d.logprobs is not None and out.logprobs is not None and top_n is not None:
                    d.logprobs += [self._logprob(t, lp, top_n) for t, lp in zip(out.token_ids, out.logprobs)]
                d.finish_reason = out.finish_reason or d.finish_reason
        return StreamItem(
            prompt_tokens, [deltas[i] for i in sorted(deltas)], group[-1].finished, group[-1].steering_report
        )

    def _logprob(self, token_id: int, logprobs: dict[int, float], top_n: int) -> TokenLogprob:
        text = self._prompts.token_text
        top = sorted(logprobs.items(), key=lambda kv: -kv[1])[:top_n]
        return TokenLogprob(text(token_id), logprobs[token_id], [(text(t), lp) for t, lp in top])

    # --- activations -----------------------------------------------------------------------------------------------
    async def activations(self, req: ActivationsRequest, sae_version: int) -> ActivationsResponse:
        await self._saes.catch_up(sae_version, {e.sae for e in req.steering if e.sae} | set(req.saes))
        rendered, _ = self._render(req)
        steps = self._fit(len(rendered.token_ids), max(req.max_tokens, 1), "max_tokens")
        capture = CaptureSpec(
            saes=req.saes, top_k=req.top_k, features=req.features, include_generated=req.max_tokens > 0
        )
        sampling = Sampling(max_tokens=steps, temperature=req.temperature, seed=req.seed)
        generated: list[int] = []
        captures: dict = {}
        report = None
        # engine.generate rather than engine.activations: a one-token continuation is returned too.
        async for update in self._engine.generate(rendered.token_ids, sampling, req.steering, capture):
            for out in update.outputs:
                generated += out.token_ids
            if update.captures is not None:
                captures = update.captures
            report = update.steering_report or report
        if req.max_tokens == 0:
            generated = []
        tokens, text, gen_text = await asyncio.to_thread(
            activation_rows, self._prompts, req, rendered, generated, captures
        )
        prompt_tokens = len(rendered.token_ids)
        return ActivationsResponse(
            model=self.config.served_model_name,
            saes=req.saes,
            text=text,
            generated_text=gen_text,
            tokens=tokens,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(generated),
                total_tokens=prompt_tokens + len(generated),
            ),
            steering_report=report,
        )

    # --- health ----------------------------------------------------------------------------------------------------
    async def health(self) -> None:
        """Raises EngineUnavailable unless the engine answers a one-token generation."""
        await self._engine.health()

    async def ping(self) -> None:
        """Answers once this replica runs: the ingress's probe for a replacement while the model is down."""

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a dead engine makes Serve replace this replica."""
        if not self._engine.running:
            raise RuntimeError("the engine is not running")

    def __del__(self):
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
