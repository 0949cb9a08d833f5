"""The model deployment: one SAEEngine per replica, plus what needs the tokenizer or SAE weights.

Methods take and return the dataclasses of `serve.calls`; expected failures come back as `CallError` values.
The class is plain; `serve.app.build_app` turns it into a Ray Serve deployment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .calls import (
    ActivationsCall,
    ActivationsOut,
    CallError,
    ChoiceDelta,
    GenerateCall,
    StreamItem,
    TokenLogprob,
)
from .config import ServiceConfig
from .engine import EngineNotReady, GenerationUpdate, SAEEngine, Sampling
from .feature_lens import FeatureLens
from .feature_search import search
from .prompting import PromptRenderer, RenderedPrompt
from .registry_watcher import ManifestWatcher
from .sae_registry import CARD_FILE, FEATURE_STATS_FILE, check_sae_id, published, read_json, resolve
from .stream_batch import batched
from .steering_spec import CaptureSpec, SAEMeta, SpecError

logger = logging.getLogger("sae_serve")


def _engine_down(e: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(e, (EngineNotReady, EngineDeadError))


ENGINE_DOWN = CallError(503, "the engine is not running; retry shortly", code="engine_unavailable")


def meta_dict(meta: SAEMeta) -> dict[str, Any]:
    return {"id": meta.sae_id, "hook_point": meta.hook_point, "architecture": meta.architecture,
            "d_in": meta.d_in, "d_sae": meta.d_sae, "version": meta.version}


class SAEModel:
    """Owns one engine; converges on the SAE directory's set (see serve/sae_directory.py)."""

    async def __init__(self, config: dict, directory):
        import torch

        torch.set_num_threads(1)  # only feature cards compute here; the engine's worker has its own process
        self.config = ServiceConfig.model_validate(config)
        # SAEs come from the directory, so that every replica serves the same set.
        self._engine = await SAEEngine.start(self.config.engine.model_copy(update={"saes": {}}))
        self._prompts = PromptRenderer(self._engine.model_dir)
        self._lens = FeatureLens(self._engine.model_dir)
        self._directory = directory
        self._loaded: dict[str, tuple[str, int]] = {}  # sae id -> (folder, directory version of its put)
        self._version = 0
        self._streams = 0  # generations streaming from this replica now
        self._sync_lock = asyncio.Lock()
        await self._sync()
        self._sync_task = asyncio.create_task(self._sync_forever())
        self._watch_task = None
        if self.config.watch_registry and self.config.sae_registry is not None:
            self._watch_task = asyncio.create_task(self._watch_registry(ManifestWatcher(self.config.sae_registry)))

    # --- SAE set ---------------------------------------------------------------------------------------------------
    async def _sync(self, min_version: int = 0) -> None:
        async with self._sync_lock:
            if min_version and self._version >= min_version:
                return
            snap = await self._directory.snapshot.remote()
            for sae_id in [s for s in self._loaded if snap.saes.get(s) != self._loaded[s]]:
                await self._engine.unload_sae(sae_id)
                del self._loaded[sae_id]
            for sae_id, entry in snap.saes.items():
                if sae_id in self._loaded:
                    continue
                try:
                    await self._engine.load_sae(entry[0], sae_id)
                    self._loaded[sae_id] = entry
                except Exception as e:  # one bad folder must not keep the others from loading
                    if _engine_down(e):
                        raise
                    logger.error("cannot load SAE %r from %s: %s", sae_id, entry[0], e)
                    await self._directory.reject.remote(sae_id, f"cannot load an SAE from {entry[0]!r}: {e}")
            self._version = snap.version

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sae_sync_interval_s)
            try:
                await self._sync()
            except Exception as e:  # keep converging; a dead engine is reported by check_health
                logger.warning("SAE sync failed: %s", e)

    async def _watch_registry(self, watcher: ManifestWatcher) -> None:
        """Load each new publish of the registry once across replicas (the directory hands out claims)."""
        handled: dict[str, int] = {}
        while True:
            try:
                for sae_id, entry in (watcher.changed() or {}).items():
                    if entry.version <= handled.get(sae_id, 0):
                        continue
                    handled[sae_id] = entry.version
                    if await self._directory.claim.remote(sae_id, entry.version):
                        await self._load_published(sae_id, entry.folder, entry.version)
            except Exception as e:  # keep watching; a dead engine is reported by check_health
                logger.warning("SAE registry watch failed: %s", e)
            await asyncio.sleep(self.config.registry_poll_interval_s)

    async def _load_published(self, sae_id: str, folder: Path, publish_version: int) -> None:
        result = await self.load_sae(str(folder), sae_id)
        if isinstance(result, CallError):
            logger.error("registry publish %d of SAE %r rejected: %s", publish_version, sae_id, result.message)
            await self._directory.reject.remote(sae_id, result.message)
        else:
            logger.info("registry publish %d of SAE %r loaded", publish_version, sae_id)

    async def _catch_up(self, version: int, sae_ids: set[str] = frozenset()) -> None:
        """Sync when the caller has seen a newer SAE set, or names an SAE another replica may have just loaded."""
        if version > self._version or not sae_ids <= self._loaded.keys():
            await self._sync(version)

    async def registry_status(self) -> dict[str, Any]:
        """The registry's publishes and what became of each here: loaded, rejected (why) or pending."""
        registry = self.config.sae_registry
        entries = await asyncio.to_thread(published, registry) if registry is not None else {}
        errors = await self._directory.errors.remote()
        rows = []
        for sae_id, entry in entries.items():
            loaded = self._loaded.get(sae_id, ("",))[0] == str(entry.folder)
            error = errors.get(sae_id)
            state = "rejected" if error else "loaded" if loaded else "pending"
            rows.append({"id": sae_id, "version": entry.version, "state": state, "error": error})
        return {"watching": self._watch_task is not None, "entries": rows}

    async def _served(self, sae_id: str, version: int) -> tuple[SAEMeta, Path] | CallError:
        """The SAE's metadata and folder once this replica has caught up, or the 404 for an SAE not loaded."""
        await self._catch_up(version)
        meta = next((m for m in self._engine.saes() if m.sae_id == sae_id), None)
        if meta is None or sae_id not in self._loaded:
            return CallError(404, f"SAE {sae_id!r} is not loaded", "id", "sae_not_found")
        return meta, Path(self._loaded[sae_id][0])

    async def saes(self, version: int = 0) -> list[dict[str, Any]]:
        await self._catch_up(version)
        return [meta_dict(m) for m in sorted(self._engine.saes(), key=lambda m: m.sae_id)]

    async def sae_card(self, sae_id: str, version: int = 0) -> dict[str, Any] | CallError:
        served = await self._served(sae_id, version)
        if isinstance(served, CallError):
            return served
        meta, folder = served
        cfg = await asyncio.to_thread(self._lens.config, sae_id, meta.version, folder)
        return {**meta_dict(meta), "model": cfg.model, "k": cfg.k, "metadata": cfg.metadata,
                "card": read_json(folder / CARD_FILE), "has_feature_stats": (folder / FEATURE_STATS_FILE).is_file()}

    async def feature(self, sae_id: str, index: int, top_n: int, version: int = 0) -> dict[str, Any] | CallError:
        served = await self._served(sae_id, version)
        if isinstance(served, CallError):
            return served
        meta, folder = served
        if not 0 <= index < meta.d_sae:
            return CallError(404, f"feature {index} out of range for SAE {sae_id!r} with {meta.d_sae} features",
                             "feature", "feature_not_found")
        return await asyncio.to_thread(
            self._lens.card, sae_id, meta.version, folder, index, top_n, self._prompts.token_text
        )

    async def load_sae(self, path: str, sae_id: str | None) -> tuple[dict[str, Any], int] | CallError:
        """Validate and load here first (a bad SAE changes nothing anywhere), then publish to the directory."""
        try:
            folder = resolve(self.config.sae_registry, path)
        except ValueError as e:
            return CallError(400, f"path: {e}", "path")
        sae_id = sae_id or folder.name
        bad_id = check_sae_id(sae_id)
        if bad_id:
            return CallError(400, f"id: {bad_id}", "id")
        async with self._sync_lock:
            try:
                meta = await self._engine.load_sae(folder, sae_id)
            except Exception as e:
                if _engine_down(e):
                    return ENGINE_DOWN
                return CallError(400, f"path: cannot load an SAE from {path!r}: {e}", "path", "invalid_sae")
            version = await self._directory.put.remote(sae_id, str(folder))
            self._loaded[sae_id] = (str(folder), version)
        return meta_dict(meta), version

    async def unload_sae(self, sae_id: str) -> int | CallError:
        async with self._sync_lock:
            if sae_id not in self._loaded:
                return CallError(404, f"SAE {sae_id!r} is not loaded", "id", "sae_not_found")
            try:
                await self._engine.unload_sae(sae_id)
            except Exception as e:
                if _engine_down(e):
                    return ENGINE_DOWN
                raise
            del self._loaded[sae_id]
            return await self._directory.remove.remote(sae_id)

    # --- generation ------------------------------------------------------------------------------------------------
    def _prompt(self, call_prompt, param: str) -> RenderedPrompt | CallError:
        rendered = self._prompts.render(call_prompt, param)
        if isinstance(rendered, CallError):
            return rendered
        limit = self.config.limits.max_prompt_tokens
        if len(rendered.token_ids) > limit:
            return CallError(400, f"{param}: the prompt has {len(rendered.token_ids)} tokens; the limit is {limit}",
                             param, "context_length_exceeded")
        return rendered

    def _fit(self, prompt_len: int, max_tokens: int | None, param: str) -> int | CallError:
        room = self.config.engine.max_model_len - prompt_len
        if max_tokens is None:
            if room < 1:
                return CallError(400, f"the prompt ({prompt_len} tokens) fills the model's context "
                                      f"({self.config.engine.max_model_len} tokens)", None, "context_length_exceeded")
            return min(room, self.config.limits.max_tokens)
        if max_tokens > room:
            return CallError(
                400,
                f"This model's maximum context length is {self.config.engine.max_model_len} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param, "context_length_exceeded",
            )
        return max_tokens

    async def generate(self, call: GenerateCall, prompt_param: str, max_tokens_param: str) -> AsyncIterator[StreamItem]:
        """Stream of StreamItems; an invalid request yields one item carrying only the error."""
        try:
            await self._catch_up(call.sae_version, {e.sae for e in call.steering})
            rendered = self._prompt(call.prompt, prompt_param)
            if isinstance(rendered, CallError):
                yield StreamItem(error=rendered)
                return
            max_tokens = self._fit(len(rendered.token_ids), call.max_tokens, max_tokens_param)
            if isinstance(max_tokens, CallError):
                yield StreamItem(error=max_tokens)
                return
            self._engine.check_specs(call.steering, None, call.n)
        except SpecError as e:
            yield StreamItem(error=CallError(400, str(e), e.param))
            return
        except Exception as e:
            if _engine_down(e):
                yield StreamItem(error=ENGINE_DOWN)
                return
            raise
        sampling = Sampling(max_tokens=max_tokens, temperature=call.temperature, top_p=call.top_p, seed=call.seed,
                            stop=call.stop, n=call.n, logprobs=call.logprobs)
        updates = self._engine.generate(rendered.token_ids, sampling, call.steering)
        self._streams += 1
        try:
            async for group in batched(updates, self._stream_window if call.stream else None):
                yield self._item(group, len(rendered.token_ids), call.logprobs)
        except SpecError as e:  # an SAE unloaded between the check and the start
            yield StreamItem(error=CallError(400, str(e), e.param))
        except Exception as e:
            if not _engine_down(e):
                raise
            yield StreamItem(error=ENGINE_DOWN)
        finally:
            self._streams -= 1

    def _stream_window(self) -> float:
        """Seconds to merge a stream's deltas: each message costs CPU in every process it crosses (this replica,
        the ingress, Ray's proxy if in front), so with many streams the windows widen to bound the replica's
        message rate."""
        return max(self.config.stream_batch_ms / 1000, self._streams / self.config.stream_messages_per_s)

    def _item(self, group: list[GenerationUpdate], prompt_tokens: int, top_n: int | None) -> StreamItem:
        deltas: dict[int, ChoiceDelta] = {}
        for update in group:
            for out in update.outputs:
                d = deltas.setdefault(out.index, ChoiceDelta(out.index, "", 0, [] if top_n is not None else None, None))
                d.text += out.text
                d.num_tokens += len(out.token_ids)
                if d.logprobs is not None and out.logprobs is not None:
                    d.logprobs += [self._logprob(t, lp, top_n) for t, lp in zip(out.token_ids, out.logprobs)]
                d.finish_reason = out.finish_reason or d.finish_reason
        return StreamItem(prompt_tokens, [deltas[i] for i in sorted(deltas)], group[-1].finished)

    def _logprob(self, token_id: int, logprobs: dict[int, float], top_n: int) -> TokenLogprob:
        text = self._prompts.token_text
        top = sorted(logprobs.items(), key=lambda kv: -kv[1])[:top_n]
        return TokenLogprob(text(token_id), logprobs[token_id], [(text(t), lp) for t, lp in top])

    # --- activations -----------------------------------------------------------------------------------------------
    async def activations(self, call: ActivationsCall) -> ActivationsOut | CallError:
        param = "messages" if call.prompt.messages is not None else "input"
        try:
            await self._catch_up(call.sae_version, {e.sae for e in call.steering} | set(call.saes))
            rendered = self._prompt(call.prompt, param)
            if isinstance(rendered, CallError):
                return rendered
            steps = self._fit(len(rendered.token_ids), max(call.max_tokens, 1), "max_tokens")
            if isinstance(steps, CallError):
                return steps
            capture = CaptureSpec(saes=call.saes, top_k=call.top_k, features=call.features,
                                  include_generated=call.max_tokens > 0)
            sampling = Sampling(max_tokens=steps, temperature=call.temperature, seed=call.seed)
            generated: list[int] = []
            captures: dict = {}
            # engine.generate rather than engine.activations: a one-token continuation is returned too.
            async for update in self._engine.generate(rendered.token_ids, sampling, call.steering, capture):
                for out in update.outputs:
                    generated += out.token_ids
                if update.captures is not None:
                    captures = update.captures
        except SpecError as e:
            return CallError(400, str(e), e.param)
        except Exception as e:
            if _engine_down(e):
                return ENGINE_DOWN
            raise
        if call.max_tokens == 0:
            generated = []
        return await asyncio.to_thread(self._activation_rows, call, rendered, generated, captures)

    def _activation_rows(self, call: ActivationsCall, rendered: RenderedPrompt, generated: list[int],
                         captures: dict) -> ActivationsOut:
        text = rendered.text or ""
        offsets = list(rendered.offsets or [])
        gen_text = self._prompts.decode(generated)
        prev = 0
        for j in range(len(generated)):
            end = len(self._prompts.decode(generated[: j + 1])) if j + 1 < len(generated) else len(gen_text)
            offsets.append((len(text) + prev, len(text) + end))
            prev = end
        rows: dict[str, dict[int, int]] = {
            sae_id: {p: r for r, p in enumerate(cap["positions"])} for sae_id, cap in captures.items()
        }
        ids = rendered.token_ids + generated
        tokens = []
        for i, tid in enumerate(ids):
            saes: dict[str, Any] | None = {}
            for sae_id in call.saes:
                r = rows.get(sae_id, {}).get(i)
                if r is None:
                    saes = None
                    break
                cap = captures[sae_id]
                saes[sae_id] = {
                    "top": list(zip(cap["top_indices"][r], cap["top_values"][r])),
                    "features": list(zip(call.features.get(sae_id, []), cap["feature_values"][r])),
                }
            tokens.append({"index": i, "id": tid, "text": self._prompts.token_text(tid), "offset": offsets[i],
                           "generated": i >= len(rendered.token_ids), "saes": saes})
        return ActivationsOut(text, gen_text, len(rendered.token_ids), len(generated), tokens)

    # --- health ----------------------------------------------------------------------------------------------------
    async def health(self) -> CallError | None:
        try:
            await self._engine.health()
        except Exception as e:
            if _engine_down(e):
                return ENGINE_DOWN
            raise
        return None

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

    # --- feature explorer ------------------------------------------------------------------------------------------
    async def feature_list(self, sae_id: str, query: str, limit: int, offset: int,
                           version: int = 0) -> dict[str, Any] | CallError:
        """Feature summaries matching `query` (see serve/feature_search.py), one page."""
        served = await self._served(sae_id, version)
        if isinstance(served, CallError):
            return served
        meta, folder = served
        records = await asyncio.to_thread(self._lens.stats, sae_id, meta.version, folder)
        return {"sae": sae_id, **search(records, meta.d_sae, query, limit, offset)}

    async def sae_plot(self, sae_id: str, name: str, version: int = 0) -> bytes | CallError:
        """A PNG the trainer wrote beside the SAE; only files its card lists under files.plots are served."""
        served = await self._served(sae_id, version)
        if isinstance(served, CallError):
            return served
        _, folder = served
        plots = ((read_json(folder / CARD_FILE) or {}).get("files") or {}).get("plots") or []
        if name not in plots or not (folder / name).is_file():
            return CallError(404, f"SAE {sae_id!r} has no plot {name!r}", "name", "plot_not_found")
        return await asyncio.to_thread((folder / name).read_bytes)
