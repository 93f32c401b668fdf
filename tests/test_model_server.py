"""A model replica outside Serve: adapters deleted from the store (or republished under the same
version with other weights) leave its memory at the next health check, idle or not."""

from __future__ import annotations

import asyncio

from ddft.adapters import registry
from ddft.engines.base import GenerateRequest
from ddft.models.load import ensure_base
from ddft.store import Store
from serve import model_server
from serve.model_server import ModelServer
from tests.test_engine_hf import make_adapter


def test_deleted_adapters_leave_the_replica_at_its_health_check(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    kept, doomed = (
        make_adapter(store, base, "text", seed, tmp_path, name=name, owner="tenant-acme")
        for seed, name in enumerate(("kept", "doomed"))
    )
    server = ModelServer(store, "tiny", engine="hf", cache_size=4)
    monkeypatch.setattr(model_server, "SWEEP_EVERY_S", 0.0)

    async def scenario():
        for m in (kept, doomed):
            await server.generate(GenerateRequest("text", "Boil an egg?", None, m, 2))
        assert set(server.engine.loaded_adapters()) == {kept.ref, doomed.ref}
        await server.check_health()
        await server._sweep
        assert set(server.engine.loaded_adapters()) == {kept.ref, doomed.ref}  # both still published
        registry.delete(store, "tenant-acme", "doomed")
        await server.check_health()  # returns at once: the sweep runs in the background
        assert await server._sweep == [doomed.ref]
        assert server.engine.loaded_adapters() == [kept.ref]

    asyncio.run(scenario())


def test_a_sweep_between_a_requests_arrival_and_its_adapter_load_loses_nothing(tmp_path, monkeypatch):
    """CI saw `KeyError: 'ddft/image/v1'` under load: Serve's multiplexed wrapper awaits a lock before
    it calls the loader, and a background sweep that ran in that gap forgot the adapter the request
    had just brought. Here the sweep runs at exactly that point."""
    store = Store(str(tmp_path / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    adapter = make_adapter(store, base, "text", 0, tmp_path, name="fresh", owner="tenant-acme")
    server = ModelServer(store, "tiny", engine="hf", cache_size=4)
    original = ModelServer.load_adapter

    async def load_after_a_sweep(self, ref):
        assert self.drop_deleted() == []  # the sweep, in the gap the wrapper's lock leaves
        return await original(self, ref)

    monkeypatch.setattr(ModelServer, "load_adapter", load_after_a_sweep)

    async def scenario():
        result = await server.generate(GenerateRequest("text", "Boil an egg?", None, adapter, 2))
        assert result.text is not None
        assert server.engine.loaded_adapters() == [adapter.ref]

    asyncio.run(scenario())
