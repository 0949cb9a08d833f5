"""The SAE residency set under a byte budget, with a recording pager in place of the workers: least recently
used out first, pinned SAEs never, a request waits for room and gets a 503 when none comes, an SAE larger than
the budget is refused."""

from __future__ import annotations

import asyncio

import pytest

from serve.engine.residency import Residency
from serve.errors import SpecError, Unavailable

pytestmark = pytest.mark.fast  # no engine: the pager is a list

MB = 1 << 20


class Pager:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    async def __call__(self, page_in: list[str], page_out: list[str]) -> None:
        self.calls.append((page_in, page_out))


async def loaded(budget: int | None, *ids: str, wait_s: float = 1.0) -> tuple[Residency, Pager]:
    pager = Pager()
    residency = Residency(budget, pager, wait_s)
    for sae_id in ids:
        await residency.added(sae_id, MB)
    return residency, pager


async def test_without_a_budget_nothing_is_ever_paged():
    residency, pager = await loaded(None, "a", "b", "c")
    async with residency.reserve(["a", "b", "c"]):
        assert all(residency.is_resident(s) for s in "abc")
    assert pager.calls == []


async def test_least_recently_used_goes_out_first():
    residency, pager = await loaded(2 * MB, "a", "b", "c")
    assert pager.calls == [([], ["a"])]  # c's load made room
    async with residency.reserve(["b"]):  # b is now the most recent
        pass
    async with residency.reserve(["a"]):
        assert residency.is_resident("a") and residency.is_resident("b") and not residency.is_resident("c")
    assert pager.calls[-1] == (["a"], ["c"]) and residency.page_ins == 1
    assert residency.used() <= 2 * MB


async def test_a_request_waits_for_a_pinned_sae_to_be_released_then_runs():
    residency, pager = await loaded(1 * MB, "a", "b")
    order: list[str] = []

    async def first() -> None:
        async with residency.reserve(["b"]):
            order.append("b pinned")
            await asyncio.sleep(0.2)
            order.append("b released")

    async def second() -> None:
        await asyncio.sleep(0.05)
        async with residency.reserve(["a"]):
            order.append("a resident")
            assert residency.is_resident("a") and not residency.is_resident("b")

    await asyncio.gather(first(), second())
    assert order == ["b pinned", "b released", "a resident"]
    assert pager.calls[-1] == (["a"], ["b"])


async def test_waiting_past_the_bound_is_a_503_and_changes_nothing():
    residency, pager = await loaded(1 * MB, "a", "b", wait_s=0.1)
    async with residency.reserve(["b"]):
        calls = list(pager.calls)
        with pytest.raises(Unavailable, match="a cannot be paged in") as err:
            async with residency.reserve(["a"]):
                raise AssertionError("reserved without room")
        assert err.value.headers["Retry-After"]
        assert pager.calls == calls and residency.is_resident("b")
    async with residency.reserve(["a"]):  # and it is free again afterwards
        assert residency.is_resident("a")


async def test_one_request_needing_more_than_the_budget_fails_rather_than_hangs():
    residency, _ = await loaded(1 * MB, "a", "b", wait_s=0.1)
    with pytest.raises(Unavailable):
        async with residency.reserve(["a", "b"]):
            pass


async def test_an_sae_larger_than_the_budget_is_refused():
    residency, _ = await loaded(1 * MB)
    with pytest.raises(SpecError, match="more than the whole SAE budget") as err:
        residency.check_fits("big", 2 * MB)
    assert err.value.param == "sae_memory_gib"
    residency.check_fits("small", MB)
