"""Which SAEs hold device memory, under a byte budget: least recently used first out, never one a running request
uses. Runs in the engine facade; `page` is the call that moves weights on every worker (master copies stay in host
memory there).

A request reserves its SAEs before it is queued (`reserve`): resident ones are pinned at once; the others are paged
in after evicting unpinned SAEs, oldest use first. When pinned SAEs leave no room, the request waits until a release
makes room, for at most `wait_s`, then fails with 503 and Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from serve.errors import SpecError, Unavailable

Pager = Callable[[list[str], list[str]], Awaitable[None]]  # (page_in, page_out) on every worker


class Residency:
    """The resident set and its pins. `budget` None: every SAE stays resident, and nothing is ever paged."""

    def __init__(self, budget: int | None, page: Pager, wait_s: float) -> None:
        self.budget = budget
        self.wait_s = wait_s
        self._page = page
        self._bytes: dict[str, int] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self.page_ins = 0

    def is_resident(self, sae_id: str) -> bool:
        return sae_id in self._resident

    def used(self) -> int:
        return sum(self._bytes[s] for s in self._resident)

    def check_fits(self, sae_id: str, size: int) -> None:
        """An SAE larger than the whole budget can never be paged in: refuse it at load."""
        if self.budget is not None and size > self.budget:
            raise SpecError(
                f"SAE {sae_id!r} needs {size / 2**30:.3f} GiB of device memory, more than the whole SAE budget "
                f"(sae_memory_gib = {self.budget / 2**30:.3f}); raise sae_memory_gib or load a smaller SAE",
                "sae_memory_gib",
            )

    async def added(self, sae_id: str, size: int) -> None:
        """A newly loaded SAE (resident on the workers): make room for it, or page it out at once if none can be
        made now."""
        self._bytes[sae_id] = size
        self._resident[sae_id] = None
        if self.budget is None:
            return
        evict = self._victims(self.used() - self.budget, keep={sae_id})
        if evict is None:
            del self._resident[sae_id]
            await self._page([], [sae_id])
            return
        await self._move([], evict)

    async def removed(self, sae_id: str) -> None:
        self._bytes.pop(sae_id, None)
        self._resident.pop(sae_id, None)
        self._pins.pop(sae_id, None)
        async with self._changed:
            self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def reserve(self, sae_ids: Iterable[str]) -> AsyncIterator[None]:
        """Hold these SAEs resident for the body (a request's whole life in the engine)."""
        wanted = [s for s in dict.fromkeys(sae_ids) if s in self._bytes]
        await self._acquire(wanted)
        try:
            yield
        finally:
            for s in wanted:
                self._pins[s] -= 1
                if not self._pins[s]:
                    del self._pins[s]
            async with self._changed:
                self._changed.notify_all()

    async def _acquire(self, wanted: list[str]) -> None:
        if self.budget is None:  # everything is resident
            for s in wanted:
                self._pins[s] = self._pins.get(s, 0) + 1
            return
        budget = self.budget
        deadline = time.monotonic() + self.wait_s
        async with self._changed:
            while True:
                missing = [s for s in wanted if s not in self._resident]
                need = sum(self._bytes[s] for s in missing)
                evict = [] if not missing else self._victims(self.used() + need - budget, keep=set(wanted))
                if evict is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(
                        f"SAE memory is busy: {', '.join(missing)} cannot be paged in while running requests hold "
                        f"the budget (sae_memory_gib); retry"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
            for s in wanted:  # pinned before paging, so no concurrent reservation evicts them
                self._pins[s] = self._pins.get(s, 0) + 1
            if missing:
                await self._move(missing, evict)
            for s in wanted:
                self._resident.move_to_end(s)

    def _victims(self, excess: int, keep: set[str]) -> list[str] | None:
        """Unpinned SAEs, least recently used first, whose removal frees `excess` bytes; None if they cannot."""
        if excess <= 0:
            return []
        out, freed = [], 0
        for s in self._resident:
            if freed >= excess:
                break
            if s in keep or self._pins.get(s):
                continue
            out.append(s)
            freed += self._bytes[s]
        return out if freed >= excess else None

    async def _move(self, page_in: list[str], page_out: list[str]) -> None:
        if page_in or page_out:
            await self._page(page_in, page_out)
        for s in page_out:
            del self._resident[s]
        for s in page_in:
            self._resident[s] = None
        self.page_ins += len(page_in)
