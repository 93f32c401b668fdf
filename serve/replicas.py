"""The gateway's client of the model replicas: one handle per (adapter version, streaming or not),
so Serve's multiplexing sends a request to a replica already holding its weights; timeouts,
retries when a replica died, back-pressure as 503, a replica's errors as their kinds, and every
answer counted on /metrics."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ddft.engines.base import Chunk, GenerateRequest, GenerateResult
from serve import prometheus
from serve.errors import GenerationFailed, Overloaded, Timeout, from_replica
from serve.model_server import ReplicaInfo, ServedResult, multiplexed_id

MAX_HANDLES = 4096  # cached model handles (one per adapter version and streaming or not)
RETRIES = 3  # tries when the replica died (Serve is replacing it)


class Replicas:
    def __init__(self, model: DeploymentHandle, timeout_s: float):
        self.model, self.timeout_s = model, timeout_s
        self._handles: dict[tuple[str | None, bool], DeploymentHandle] = {}

    def _handle(self, request: GenerateRequest, stream: bool = False) -> DeploymentHandle:
        """The model handle for a request, made once per (adapter, streaming) and kept."""
        mux = multiplexed_id(request.adapter) if request.adapter else None
        handle = self._handles.get((mux, stream))
        if handle is None:
            if len(self._handles) >= MAX_HANDLES:  # deleted adapters' handles go with the rest
                self._handles.clear()
            options = {"stream": True} if stream else {}
            if mux is not None:
                options["multiplexed_model_id"] = mux
            handle = self._handles[(mux, stream)] = self.model.options(**options) if options else self.model
        return handle

    def _timeout(self) -> Timeout:
        return Timeout(f"generation took over {self.timeout_s:.0f}s; retry, or lower max_new_tokens")

    @staticmethod
    async def _first(start: Callable[[], Awaitable]):
        """`start()`'s answer from a replica: retried when the replica died, Overloaded when every
        queue is full, the replica's error as its kind."""
        for attempt in range(RETRIES):
            try:
                return await start()
            except BackPressureError:
                raise Overloaded("every model replica's queue is full; retry after the Retry-After seconds") from None
            except RayActorError:  # the replica died (killed, OOM): Serve is replacing it; try another
                if attempt == RETRIES - 1:
                    raise Overloaded("a model replica is being replaced; retry shortly", 5) from None
                await asyncio.sleep(0.5 * (attempt + 1))
            except Timeout:
                raise
            except Exception as err:
                raise from_replica(err) from None

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        handle = self._handle(request)

        async def call():
            response = handle.generate.remote(request)
            try:
                return await asyncio.wait_for(response, self.timeout_s)
            except TimeoutError:
                response.cancel()
                raise self._timeout() from None

        prometheus.get().queue_depth.inc()
        try:
            result = await self._first(call)
        finally:
            prometheus.get().queue_depth.dec()
        count(request, result)
        return result

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """The replica's chunks as they come, the last with the result. Every failure is a kind of
        error: before the first chunk the route still answers it as JSON; after, as an SSE event."""
        handle = self._handle(request, stream=True)
        deadline = time.monotonic() + self.timeout_s
        replies = None

        async def next_chunk() -> Chunk:
            try:
                return await asyncio.wait_for(anext(replies), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise self._timeout() from None
            except StopAsyncIteration:
                raise GenerationFailed("the model replica's stream ended without a result") from None

        async def start() -> Chunk:
            nonlocal replies
            replies = handle.stream.remote(request)
            return await next_chunk()

        prometheus.get().queue_depth.inc()
        chunk = None
        try:
            chunk = await self._first(start)
            while chunk.result is None:
                yield chunk
                try:
                    chunk = await next_chunk()
                except (Timeout, GenerationFailed):
                    raise
                except Exception as err:
                    raise from_replica(err) from None
            count(request, chunk.result)  # before the last yield: the consumer closes us after it
            yield chunk
        finally:
            prometheus.get().queue_depth.dec()
            if replies is not None and (chunk is None or chunk.result is None):
                replies.cancel()  # timed out, failed or the client left: the replica stops the request

    async def info(self, timeout_s: float) -> ReplicaInfo:
        """One replica's description of itself (its gauges counted on /metrics)."""
        info = await asyncio.wait_for(self.model.info.remote(), timeout_s)
        prometheus.get().replica_stats(info.replica, info.stats)
        return info


def count(request: GenerateRequest, result: GenerateResult) -> None:
    """An answer on /metrics: its replica's engine counters, its timings and tokens."""
    if isinstance(result, ServedResult):
        prometheus.get().replica_stats(result.replica, result.stats)
    prometheus.get().engine_timings(request.modality, result.adapter, result.timings)
    prometheus.get().count_tokens(
        request.modality, result.adapter, result.timings.get("prompt_tokens", 0), result.timings.get("new_tokens", 0)
    )
