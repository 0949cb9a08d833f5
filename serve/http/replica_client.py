"""The ingress's typed client of the model deployment: one async method per replica call.

The replica raises `serve.errors` exceptions; Ray re-raises them here as subclasses of `RayTaskError` and the
original class, and `_replica_errors` unwraps them to the original. Ray's own failures become errors of ours:
overload (the model deployment's `max_queued_requests` reached, Ray's BackPressureError) a 503 with Retry-After;
a dead or missing replica (killed, restarting) a 503 as well. Ray's router would hold calls made while no model
replica runs until a replacement is up (a minute or more for an engine start), so once a call has found the model
down, later ones are answered 503 at once until a probe gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

from serve.errors import InternalError, ModelUnavailable, Overloaded, ServeError
from serve.protocol import (
    ActivationsRequest,
    ActivationsResponse,
    FeatureCard,
    FeatureList,
    GenerationRequest,
    RegistryStatus,
    SAECard,
    SAEInfo,
    StreamItem,
)

T = TypeVar("T")


@contextlib.contextmanager
def _replica_errors(went_down: Callable[[], None]) -> Iterator[None]:
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    try:
        yield
    except BackPressureError as e:
        retry = {"Retry-After": str(int(e.retry_after_s or 1))}
        raise Overloaded("the service is overloaded; retry later", headers=retry) from None
    except (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError, ActorUnavailableError):
        went_down()
        raise ModelUnavailable() from None
    except RayTaskError as e:
        if isinstance(e.cause, ServeError):
            raise e.cause from None
        raise


class ReplicaClient:
    """Calls on the model deployment; remembers the newest SAE-set version this ingress has seen and whether the
    model was last found down."""

    PROBE_INTERVAL_S = 1.0

    def __init__(self, handle):
        self._handle = handle
        self.sae_version = 0
        self._recovery: asyncio.Task | None = None  # running while the model is known to be down

    def saw_version(self, version: int) -> None:
        self.sae_version = max(self.sae_version, version)

    def _refuse_while_down(self) -> None:
        if self._recovery is not None and not self._recovery.done():
            raise ModelUnavailable()

    def _went_down(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._await_recovery())

    async def _await_recovery(self) -> None:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        while True:
            try:
                await self._handle.ping.remote()  # held by Ray's router until a replica runs
                return
            except (RayServeException, RayError):
                await asyncio.sleep(self.PROBE_INTERVAL_S)

    async def _call(self, start: Callable[[], Awaitable[T]]) -> T:
        self._refuse_while_down()
        with _replica_errors(self._went_down):
            return await start()

    # --- one method per replica call -------------------------------------------------------------------------------
    async def saes(self) -> list[SAEInfo]:
        return await self._call(lambda: self._handle.saes.remote(self.sae_version))

    async def sae_card(self, sae_id: str) -> SAECard:
        return await self._call(lambda: self._handle.sae_card.remote(sae_id, self.sae_version))

    async def feature(self, sae_id: str, index: int, top_n: int) -> FeatureCard:
        return await self._call(lambda: self._handle.feature.remote(sae_id, index, top_n, self.sae_version))

    async def feature_list(self, sae_id: str, query: str, limit: int, offset: int) -> FeatureList:
        return await self._call(
            lambda: self._handle.feature_list.remote(sae_id, query, limit, offset, self.sae_version)
        )

    async def sae_plot(self, sae_id: str, name: str) -> bytes:
        return await self._call(lambda: self._handle.sae_plot.remote(sae_id, name, self.sae_version))

    async def load_sae(self, path: str, sae_id: str | None) -> SAEInfo:
        info, version = await self._call(lambda: self._handle.load_sae.remote(path, sae_id))
        self.saw_version(version)
        return info

    async def unload_sae(self, sae_id: str) -> None:
        self.saw_version(await self._call(lambda: self._handle.unload_sae.remote(sae_id)))

    async def registry_status(self) -> RegistryStatus:
        return await self._call(lambda: self._handle.registry_status.remote())

    async def activations(self, req: ActivationsRequest) -> ActivationsResponse:
        return await self._call(lambda: self._handle.activations.remote(req, self.sae_version))

    async def health(self) -> None:
        await self._call(lambda: self._handle.health.remote())

    async def generate(self, req: GenerationRequest) -> GenerationStream:
        """Start a generation; raises before any response is sent if the request is refused."""
        self._refuse_while_down()
        gen = self._handle.options(stream=True).generate.remote(req, self.sae_version)
        stream = GenerationStream(gen, self._went_down)
        try:
            first = await stream.next()
            if first is None:
                raise InternalError("the model ended the stream without output")
        except BaseException:
            stream.close()
            raise
        stream.pending = first
        return stream


class GenerationStream:
    """Items of one generation; `close()` cancels it on the replica (the engine aborts the request)."""

    def __init__(self, gen, went_down: Callable[[], None]):
        self._gen = gen
        self._went_down = went_down
        self.pending: StreamItem | None = None
        self.done = False

    async def next(self) -> StreamItem | None:
        with _replica_errors(self._went_down):
            try:
                return await self._gen.__anext__()
            except StopAsyncIteration:
                self.done = True
                return None

    async def items(self) -> AsyncIterator[StreamItem]:
        if self.pending is not None:
            item, self.pending = self.pending, None
            yield item
        while (item := await self.next()) is not None:
            yield item

    def close(self) -> None:
        """Best effort, and never raises: Ray's cancel() re-raises the failure of a request that never started."""
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        if self.done:
            return
        self.done = True
        try:
            self._gen.cancel()
        except (RayServeException, RayError):
            pass
