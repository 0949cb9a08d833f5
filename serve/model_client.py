"""The ingress's side of the model deployment: handle calls, with Ray's failures turned into HTTP errors.

Overload (the model deployment's `max_queued_requests` reached) answers at once with Ray's BackPressureError,
which becomes a 503 with Retry-After; a dead or missing replica (killed, restarting) becomes a 503 with Retry-After
as well. Ray's router would hold calls made while no model replica runs until a replacement is up (a minute or more
for an engine start), so once a call has found the model down, later ones are answered 503 at once until a probe
gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from .calls import CallError, GenerateCall, StreamItem
from .errors import UNAVAILABLE_RETRY_AFTER, APIError


def _model_unavailable() -> APIError:
    return APIError(503, "the model is unavailable; retry shortly", code="model_unavailable",
                    headers=UNAVAILABLE_RETRY_AFTER)


@contextlib.contextmanager
def _ray_errors(went_down: Callable[[], None]):
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    try:
        yield
    except BackPressureError as e:
        retry = {"Retry-After": str(int(e.retry_after_s or 1))}
        raise APIError(e.status_code, "the service is overloaded; retry later", code="overloaded",
                       headers=retry) from None
    except (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError, ActorUnavailableError):
        went_down()
        raise _model_unavailable() from None


def _raise_if_error(result: Any) -> Any:
    if isinstance(result, CallError):
        raise APIError.from_call(result)
    return result


class ModelClient:
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
            raise _model_unavailable()

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

    async def call(self, method: str, *args) -> Any:
        self._refuse_while_down()
        with _ray_errors(self._went_down):
            result = await getattr(self._handle, method).remote(*args)
        return _raise_if_error(result)

    async def stream(self, call: GenerateCall, prompt_param: str, max_tokens_param: str) -> "GenerationStream":
        """Start a generation; raises APIError before any response is sent if the request is refused."""
        self._refuse_while_down()
        gen = self._handle.options(stream=True).generate.remote(call, prompt_param, max_tokens_param)
        stream = GenerationStream(gen, self._went_down)
        try:
            first = await stream.next()
            if first is None:
                raise APIError(500, "the model ended the stream without output")
            _raise_if_error(first.error)
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
        with _ray_errors(self._went_down):
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
            _raise_if_error(item.error)
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
