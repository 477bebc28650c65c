"""Connection slots: a waiting read goes before a waiting write; writes have their own ceiling."""

from __future__ import annotations

import asyncio

from sglang_objectcache.engine.slots import PrioritySlots


def test_reads_overtake_queued_writes_and_writes_are_capped():
    async def run():
        slots = PrioritySlots(total=2, max_writes=1)
        order: list[str] = []
        gate = asyncio.Event()

        async def job(name: str, write: bool):
            async with slots.acquire(write=write):
                order.append(name)
                await gate.wait()

        tasks = [asyncio.create_task(job("w1", True))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(job("w2", True)))  # waits: one write at a time
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(job("r1", False)))  # takes the second slot at once
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(job("r2", False)))  # queued behind the full slots
        await asyncio.sleep(0)
        assert order == ["w1", "r1"]
        assert (slots.active, slots.active_writes) == (2, 1)
        gate.set()
        await asyncio.gather(*tasks)
        assert order.index("r2") < order.index("w2")  # the queued read went first
        assert (slots.active, slots.active_writes) == (0, 0)

    asyncio.run(run())


def test_cancelled_waiter_releases_nothing_it_did_not_get():
    async def run():
        slots = PrioritySlots(total=1, max_writes=1)
        hold = asyncio.Event()

        async def holder():
            async with slots.acquire():
                await hold.wait()

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(slots.acquire().__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        hold.set()
        await h
        assert slots.active == 0
        async with slots.acquire():
            assert slots.active == 1

    asyncio.run(run())
