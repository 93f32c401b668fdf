"""Dynamic batching for an engine: the next batch is formed when the engine is free.

Serve's @serve.batch forms the next batch as soon as the previous one starts, so requests that
arrive while a long generation runs go through one by one afterwards (measured: eight concurrent
recipes ran as eight batches of one). Here one worker takes whatever waits (up to max_batch_size,
after a short wait for more when the queue is short) only once the engine has finished, so load
turns into bigger batches instead of a longer queue.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Batcher:
    def __init__(self, run: Callable[[list], Awaitable[list]], max_batch_size: int = 8, wait_s: float = 0.01):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def __call__(self, item: Any) -> Any:
        """The result for one item, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (asyncio.run again): a queue is bound to one
            self._loop, self._queue, self._worker = loop, asyncio.Queue(), None
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        await self._queue.put((item, future))
        return await future

    async def _take(self) -> list:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.done()]  # drop callers that gave up

    async def _work(self) -> None:
        while True:
            batch = await self._take()
            if not batch:
                continue
            try:
                results = await self.run([item for item, _ in batch])
            except Exception as err:  # the run's own bug: every caller gets it, the worker goes on
                results = [err] * len(batch)
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_exception(res) if isinstance(res, BaseException) else fut.set_result(res)
