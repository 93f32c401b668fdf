"""The engines' batcher: requests that arrive while a batch runs go together into the next one."""

import asyncio

import pytest

from ddft.engines.batcher import Batcher


def test_requests_arriving_during_a_batch_form_the_next_batch():
    sizes = []

    async def run(items):
        sizes.append(len(items))
        await asyncio.sleep(0.2)  # a long generation
        return [i * 10 for i in items]

    async def main():
        batcher = Batcher(run, max_batch_size=4, wait_s=0.01)
        first = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.05)  # the first batch is running now
        rest = [asyncio.create_task(batcher(i)) for i in range(1, 7)]
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [0, 10, 20, 30, 40, 50, 60]
    assert sizes == [1, 4, 2]  # not 1, 1, 1, ... as @serve.batch does in Ray 2.60


def test_errors_reach_their_callers_and_the_worker_goes_on():
    async def run(items):
        if "boom" in items:
            raise RuntimeError("engine bug")
        return [ValueError("bad") if i == "bad" else i.upper() for i in items]

    async def main():
        batcher = Batcher(run, max_batch_size=8, wait_s=0.05)
        results = await asyncio.gather(batcher("a"), batcher("bad"), return_exceptions=True)
        assert results[0] == "A" and isinstance(results[1], ValueError)
        with pytest.raises(RuntimeError, match="engine bug"):
            await batcher("boom")
        return await batcher("b")

    assert asyncio.run(main()) == "B"


def test_a_caller_that_gave_up_is_not_run():
    seen = []

    async def run(items):
        seen.extend(items)
        await asyncio.sleep(0.1)
        return items

    async def main():
        batcher = Batcher(run, max_batch_size=8, wait_s=0.0)
        first = asyncio.create_task(batcher("first"))
        await asyncio.sleep(0.02)
        late = asyncio.create_task(batcher("late"))
        await asyncio.sleep(0.01)
        late.cancel()  # timed out while the first batch ran
        await first
        await asyncio.sleep(0.15)

    asyncio.run(main())
    assert seen == ["first"]


def test_a_batcher_serves_one_event_loop_after_another():
    """An engine outlives event loops (asyncio.run per call in scripts and tests): the queue and
    worker follow the running loop instead of failing on one bound to a closed loop."""

    async def run(items):
        return [i + 1 for i in items]

    batcher = Batcher(run)
    assert asyncio.run(batcher(1)) == 2
    assert asyncio.run(batcher(2)) == 3
