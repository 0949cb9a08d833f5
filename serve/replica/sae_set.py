"""The SAEs one model replica serves, kept equal to the SAE directory's set (see serve/directory/deployment.py).

Converges after a missed publish (a periodic sync), at once for a request that has seen a newer set or names an SAE
this replica lacks, and loads each new registry publish once across replicas (the directory hands out claims).
A folder that fails to load is rejected in the directory while the rest keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, Protocol

from serve.errors import EngineUnavailable, InvalidRequest, NotFound
from serve.protocol import RegistryEntry, RegistryStatus
from serve.registry import check_sae_id, published, resolve
from serve.replica.registry_watcher import ManifestWatcher
from serve.specs import SAEMeta

logger = logging.getLogger("sae_serve")


class Engine(Protocol):
    """What the replica needs of an engine (`serve.engine.engine.SAEEngine`, or a fake in unit tests)."""

    model_dir: Path

    def saes(self) -> list[SAEMeta]: ...
    async def load_sae(self, path: str | Path, sae_id: str | None = None) -> SAEMeta: ...
    async def unload_sae(self, sae_id: str) -> None: ...


class SAESet:
    """This replica's loaded SAEs: id -> (folder, directory version of its put)."""

    def __init__(self, engine: Engine, directory, registry: Path | None):
        self._engine = engine
        self._directory = directory
        self._registry = registry
        self.loaded: dict[str, tuple[str, int]] = {}
        self.version = 0
        self.lock = asyncio.Lock()

    async def sync(self, min_version: int = 0) -> None:
        async with self.lock:
            if min_version and self.version >= min_version:
                return
            snap = await self._directory.snapshot.remote()
            for sae_id in [s for s in self.loaded if snap.saes.get(s) != self.loaded[s]]:
                await self._engine.unload_sae(sae_id)
                del self.loaded[sae_id]
            for sae_id, entry in snap.saes.items():
                if sae_id in self.loaded:
                    continue
                try:
                    await self._engine.load_sae(entry[0], sae_id)
                    self.loaded[sae_id] = entry
                except EngineUnavailable:
                    raise
                except Exception as e:  # one bad folder must not keep the others from loading
                    logger.error("cannot load SAE %r from %s: %s", sae_id, entry[0], e)
                    await self._directory.reject.remote(sae_id, f"cannot load an SAE from {entry[0]!r}: {e}")
            self.version = snap.version

    async def sync_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except Exception as e:  # keep converging; a dead engine is reported by check_health
                logger.warning("SAE sync failed: %s", e)

    async def watch_registry(self, watcher: ManifestWatcher, poll_interval_s: float) -> None:
        """Load each new publish of the registry once across replicas (the directory hands out claims)."""
        handled: dict[str, int] = {}
        while True:
            try:
                for sae_id, entry in (watcher.changed() or {}).items():
                    if entry.version <= handled.get(sae_id, 0):
                        continue
                    handled[sae_id] = entry.version
                    if await self._directory.claim.remote(sae_id, entry.version):
                        try:
                            await self._load_published(sae_id, entry.folder, entry.version)
                        except BaseException:
                            # Neither loaded nor rejected (e.g. the engine died): a replacement may claim it again.
                            await self._directory.release.remote(sae_id, entry.version)
                            raise
            except Exception as e:  # keep watching; a dead engine is reported by check_health
                logger.warning("SAE registry watch failed: %s", e)
            await asyncio.sleep(poll_interval_s)

    async def _load_published(self, sae_id: str, folder: Path, publish_version: int) -> None:
        try:
            await self.load(str(folder), sae_id)
        except InvalidRequest as e:
            logger.error("registry publish %d of SAE %r rejected: %s", publish_version, sae_id, e.message)
            await self._directory.reject.remote(sae_id, e.message)
        else:
            logger.info("registry publish %d of SAE %r loaded", publish_version, sae_id)

    async def catch_up(self, version: int, sae_ids: set[str] = frozenset()) -> None:
        """Sync when the caller has seen a newer SAE set, or names an SAE another replica may have just loaded."""
        if version > self.version or not sae_ids <= self.loaded.keys():
            await self.sync(version)

    async def served(self, sae_id: str, version: int) -> tuple[SAEMeta, Path]:
        """The SAE's metadata and folder once this replica has caught up; NotFound for an SAE not loaded."""
        await self.catch_up(version)
        meta = next((m for m in self._engine.saes() if m.sae_id == sae_id), None)
        if meta is None or sae_id not in self.loaded:
            raise NotFound(f"SAE {sae_id!r} is not loaded", "id", "sae_not_found")
        return meta, Path(self.loaded[sae_id][0])

    async def load(self, path: str, sae_id: str | None) -> tuple[SAEMeta, int]:
        """Validate and load here first (a bad SAE changes nothing anywhere), then publish to the directory."""
        try:
            folder = resolve(self._registry, path)
        except ValueError as e:
            raise InvalidRequest(f"path: {e}", "path") from None
        sae_id = sae_id or folder.name
        bad_id = check_sae_id(sae_id)
        if bad_id:
            raise InvalidRequest(f"id: {bad_id}", "id")
        async with self.lock:
            try:
                meta = await self._engine.load_sae(folder, sae_id)
            except EngineUnavailable:
                raise
            except Exception as e:
                raise InvalidRequest(f"path: cannot load an SAE from {path!r}: {e}", "path", "invalid_sae") from None
            try:
                version = await self._directory.put.remote(sae_id, str(folder))
            except BaseException:
                # Not recorded in the directory, so no other replica will serve it: neither does this one. The
                # next sync loads what the directory says for this id.
                self.loaded.pop(sae_id, None)
                with contextlib.suppress(Exception):
                    await self._engine.unload_sae(sae_id)
                raise
            self.loaded[sae_id] = (str(folder), version)
        return meta, version

    async def unload(self, sae_id: str) -> int:
        async with self.lock:
            if sae_id not in self.loaded:
                raise NotFound(f"SAE {sae_id!r} is not loaded", "id", "sae_not_found")
            await self._engine.unload_sae(sae_id)
            del self.loaded[sae_id]
            return await self._directory.remove.remote(sae_id)

    async def registry_status(self, watching: bool) -> RegistryStatus:
        """The registry's publishes and what became of each here: loaded, rejected (why) or pending."""
        entries = await asyncio.to_thread(published, self._registry) if self._registry is not None else {}
        errors = await self._directory.errors.remote()
        rows = []
        for sae_id, entry in entries.items():
            loaded = self.loaded.get(sae_id, ("",))[0] == str(entry.folder)
            error = errors.get(sae_id)
            state = "rejected" if error else "loaded" if loaded else "pending"
            rows.append(RegistryEntry(id=sae_id, version=entry.version, state=state, error=error))
        return RegistryStatus(watching=watching, entries=rows)


def sae_info_fields(meta: SAEMeta) -> dict[str, Any]:
    return {
        "id": meta.sae_id,
        "hook_point": meta.hook_point,
        "architecture": meta.architecture,
        "d_in": meta.d_in,
        "d_sae": meta.d_sae,
        "version": meta.version,
        "bytes": meta.resident_bytes,
        "resident": meta.resident,
    }
