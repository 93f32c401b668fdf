"""Model replicas: one engine (one base) each; concurrent calls are batched, mixing adapters.

Serve multiplexing (the adapter's ref is the multiplexed model id) sends a request to a replica
that already holds its adapter; the engine's LRU holds the weights. Errors travel back as data,
so a bad request is an HTTP error at the gateway and never an exception that could hurt a replica.
"""

import asyncio
import logging
import time
from dataclasses import asdict

from ray import serve

from ddft.adapters.registry import AdapterError, Manifest
from ddft.engines.base import GenerateRequest, GenerateResult, make_engine
from ddft.store import Store, StoreError
from ddft.engines.batcher import Batcher

log = logging.getLogger("ddft.serve")


class ModelServer:
    def __init__(self, store: Store, base_id: str, *, engine: str = "hf", cache_size: int = 8, device: str = "cpu",
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01):
        self.engine = make_engine(engine, store=store, base_model_id=base_id, cache_size=cache_size, device=device)
        self._manifests: dict[str, Manifest] = {}
        self._batch = Batcher(self._batched, max_batch_size, batch_wait_timeout_s)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit tests)
            self.replica = "local"

    async def load_adapter(self, ref: str) -> str:
        """The multiplexed loader (wrapped by serve.multiplexed in app.py)."""
        await asyncio.to_thread(self.engine.load_adapter, self._manifests[ref])
        return ref

    async def _batched(self, requests: list[tuple[GenerateRequest, float]]) -> list[GenerateResult | Exception]:
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.engine.generate, [r for r, _ in requests])
        except (ValueError, AdapterError) as err:
            if len(requests) == 1:
                return [err]
            # one bad request must not fail its batch-mates: answer each alone
            results = [await self._alone(r) for r, _ in requests]
        for res, (_, queued) in zip(results, requests):
            if isinstance(res, GenerateResult):
                res.timings["queue_s"] = round(started - queued, 4)
        return results

    async def _alone(self, request: GenerateRequest) -> GenerateResult | Exception:
        try:
            return (await asyncio.to_thread(self.engine.generate, [request]))[0]
        except (ValueError, AdapterError) as err:
            return err

    async def generate(self, request: GenerateRequest) -> dict:
        """{"result": GenerateResult as a dict, "stats": ...} or {"status", "error", "detail"}."""
        try:
            if request.adapter is not None:
                self._manifests[request.adapter.ref] = request.adapter
                await self.load_adapter(request.adapter.ref)
            out = await self._batch((request, time.perf_counter()))
            if isinstance(out, Exception):
                raise out
            return {"result": asdict(out), "replica": self.replica, "stats": self.engine.stats()}
        except AdapterError as err:
            return {"status": 409, "error": "adapter_unusable", "detail": str(err)}
        except StoreError as err:
            return {"status": 502, "error": "store_error", "detail": str(err)}
        except ValueError as err:
            return {"status": 400, "error": "bad_request", "detail": str(err)}
        except Exception as err:
            log.exception("generation failed")
            return {"status": 500, "error": "generation_failed", "detail": f"{type(err).__name__}: {str(err)[:300]}"}

    def evict(self, ref: str) -> bool:
        """Drop a deleted adapter from this replica's memory."""
        self._manifests.pop(ref, None)
        return self.engine.evict_adapter(ref)

    def info(self) -> dict:
        return {"base": self.engine.base_id, "replica": self.replica, "loaded_adapters": self.engine.loaded_adapters(),
                "queued": self._batch.depth(), "stats": self.engine.stats()}
