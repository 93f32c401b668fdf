"""Model replicas: one engine (one base) each; the engine batches concurrent streams, mixing adapters.

Serve multiplexing (the adapter's ref is the multiplexed model id) sends a request to a replica
that already holds its adapter; the engine's LRU holds the weights. This file knows no engine:
`stream` passes the engine's chunks on and `generate` returns the last one's result. Errors are
the engine's typed exceptions, raised as they are; the gateway maps them to HTTP (serve/errors.py).
"""

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import ray
from ray import serve

from ddft.adapters import registry
from ddft.adapters.ref import resident_key
from ddft.adapters.registry import AdapterError, Manifest
from ddft.engines.base import Chunk, EngineUnavailable, GenerateRequest, GenerateResult, make_engine
from ddft.engines.grammar import Constraint
from ddft.store import Store, StoreError
from serve.errors import GenerationFailed

log = logging.getLogger("ddft.serve")
SWEEP_EVERY_S = 10.0  # how often a replica looks for resident adapters that were deleted
# The adapter a request brought, for the multiplexed loader: Serve's wrapper calls it in the request's
# own task (after awaiting its lock), so a context variable hands it over without a shared dict.
_ARRIVING: contextvars.ContextVar[Manifest | None] = contextvars.ContextVar("ddft_arriving_adapter", default=None)


# The Serve multiplexed model id of an adapter version: the gateway asks for it and the replica's
# loader registers it, so Serve routes by adapter
multiplexed_id = resident_key


@dataclass
class ServedResult(GenerateResult):
    """A result as a replica answers it: which replica, and its engine's counters (for /metrics)."""

    replica: str = "local"
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class ReplicaInfo:
    """What a replica says about itself (GET /healthz with the admin key)."""

    base: str
    replica: str
    loaded_adapters: list[str]  # least recently used first
    ongoing: int  # requests in this replica now
    stats: dict[str, float]  # the engine's counters and gauges (engines.base STATS, FIGURES)
    node: str = ""  # the Ray node it runs on (its id)


class ModelServer:
    def __init__(self, store: Store, base_id: str, *, engine: str = "hf", device: str = "cpu", **options):
        """`options`: the engine's own keywords (engines.base.serve_options of the serve config); hf forms
        a batch when it is free, vllm adds requests to the running batch at every step."""
        self.engine = make_engine(engine, store=store, base_model_id=base_id, device=device, **options)
        self.engine.prepare(Constraint.recipe())  # compiled now: the first recipe would wait seconds for it
        self.store = store
        self._ongoing = 0
        self._sweep: asyncio.Task | None = None
        self._swept_at = float("-inf")
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.node = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Serve (unit tests)
            self.replica, self.node = "local", ""

    async def load_adapter(self, model_id: str) -> str:
        """The multiplexed loader (wrapped by serve.multiplexed in app.py): loads the adapter the
        calling request brought; `model_id` is its multiplexed_id."""
        manifest = _ARRIVING.get()
        if manifest is None or multiplexed_id(manifest) != model_id:
            raise GenerationFailed(
                f"the multiplexed loader was asked for {model_id!r} outside a request that brought it"
            )
        await asyncio.to_thread(self.engine.prefetch_adapter, manifest)
        return model_id

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """The engine's chunks (a Serve streaming method); the last carries a ServedResult."""
        self._ongoing += 1
        try:
            if request.adapter is not None:
                _ARRIVING.set(request.adapter)
                await self.load_adapter(multiplexed_id(request.adapter))
            async for chunk in self.engine.stream(request):
                if chunk.result is not None:  # timings include queue_s: the engine knows when its batch began
                    chunk.result = ServedResult(**vars(chunk.result), replica=self.replica, stats=self.engine.stats())
                yield chunk
        except (AdapterError, StoreError, EngineUnavailable, ValueError):
            raise  # the request's own problem: the gateway says so
        except Exception:
            log.exception("generation failed")
            raise
        finally:
            self._ongoing -= 1

    async def generate(self, request: GenerateRequest) -> ServedResult:
        """The whole answer at once: the stream's last chunk's result."""
        result = None
        async for chunk in self.stream(request):
            result = chunk.result
        if result is None:
            raise GenerationFailed("the engine's stream ended without a result")
        return result

    def evict(self, ref: str) -> bool:
        """Drop a deleted adapter from this replica's memory."""
        return self.engine.evict_adapter(ref)

    async def check_health(self) -> None:
        """Serve calls this on every replica every few seconds (idle ones too): the moment to drop
        adapters deleted from the store since they were loaded. The sweep runs in the background,
        so a slow store never fails a health check."""
        if (self._sweep is None or self._sweep.done()) and time.monotonic() - self._swept_at >= SWEEP_EVERY_S:
            self._swept_at = time.monotonic()
            self._sweep = asyncio.create_task(asyncio.to_thread(self.drop_deleted))

    def drop_deleted(self) -> list[str]:
        """Evict every resident adapter whose version is gone from the store (or was republished with
        other weights); returns their refs."""
        dropped = []
        for m in self.engine.resident_adapters():  # a snapshot: loads and batches go on meanwhile
            try:
                now = registry.read_manifest(self.store, m.owner, m.name, m.version)
            except (StoreError, AdapterError) as err:  # the store is unreachable: keep it, try next time
                log.warning("adapter sweep: %s", err)
                continue
            if now is None or now.weights_sha256 != m.weights_sha256:
                self.evict(m.ref)
                dropped.append(m.ref)
        if dropped:
            log.info("dropped deleted adapters %s", dropped)
        return dropped

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            self.engine.base_id,
            self.replica,
            self.engine.loaded_adapters(),
            self._ongoing,
            self.engine.stats(),
            self.node,
        )
