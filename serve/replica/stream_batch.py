"""Merge a generation stream into fewer, larger messages.

Every message costs a Ray hop (model replica -> ingress) and an ASGI send (to the client, or to Ray's proxy where it
sits in front); with 32 streams on two cores that overhead competes with decoding. Like ray.serve.llm's Batcher,
updates are collected for a short window and sent together; a stream's first update goes out at once so
time-to-first-token is not delayed (and can be measured by the ingress, for non-streaming requests too).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def batched(source: AsyncIterator[T], interval_s: float | Callable[[], float] | None) -> AsyncIterator[list[T]]:
    """Lists of consecutive items: the first alone, then what arrived in each window of `interval_s` seconds
    (a callable is asked before every window, so the window can follow the load).

    `interval_s` None: the first item, then the rest at the end; 0: every item alone. Cancelling the consumer
    cancels the reader, which closes `source`.
    """
    if interval_s == 0:
        async for item in source:
            yield [item]
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()

    async def read() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        finally:
            done.set()

    reader = asyncio.create_task(read())
    first = True
    try:
        while True:
            items: list = []
            if first:
                # Wake on the first item (or the end), not on the timer.
                getter = asyncio.ensure_future(queue.get())
                ender = asyncio.ensure_future(done.wait())
                try:
                    await asyncio.wait({getter, ender}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ender.cancel()
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    items.append(getter.result())
                    first = False
            elif interval_s is None:
                await done.wait()
            else:
                try:
                    await asyncio.wait_for(done.wait(), timeout=interval_s() if callable(interval_s) else interval_s)
                except TimeoutError:
                    pass
            while not queue.empty():
                items.append(queue.get_nowait())
            if items:
                yield items
            if done.is_set() and queue.empty():
                reader.result()  # re-raise what the source raised
                return
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
