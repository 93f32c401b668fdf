"""The host-memory tier of adapters (engines/host_tier.py): a second load of an adapter is a copy
from memory, bounded in bytes; a deleted adapter leaves it; a file that doesn't match its manifest
is never kept."""

import pytest

from ddft.adapters.registry import AdapterError, fetch
from ddft.engines.host_tier import HostTier
from ddft.models.load import ensure_base
from ddft.store import Store
from tests.test_engine_hf import make_adapter


class CountingStore(Store):
    """A file store that counts its reads (to tell a store read from a memory hit)."""

    reads = 0

    def read_bytes(self, key: str) -> bytes:
        CountingStore.reads += 1
        return super().read_bytes(key)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("host")
    store = CountingStore(str(tmp / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    return store, [make_adapter(store, base, "text", seed, tmp, name=f"t{seed}") for seed in range(3)]


def test_a_second_load_comes_from_memory(adapters):
    store, (a, b, _) = adapters
    tier = HostTier(max_mb=16)
    before = CountingStore.reads
    first = tier.files(store, a)
    assert first == fetch(store, a) and tier.counters["adapter_host_hits"] == 0
    reads = CountingStore.reads
    assert tier.files(store, a) == first and CountingStore.reads == reads  # no store read
    assert tier.counters["adapter_host_hits"] == 1
    tier.files(store, b)
    assert len(tier) == 2 and CountingStore.reads > before


def test_the_tier_keeps_to_its_bytes_and_forgets_deleted_adapters(adapters):
    store, (a, b, c) = adapters
    one = sum(map(len, fetch(store, a).values()))
    tier = HostTier(max_mb=2.5 * one / 2**20)  # room for two
    for m in (a, b, c):
        tier.files(store, m)
    assert len(tier) == 2  # a, the oldest, went
    tier.files(store, a)
    assert tier.counters["adapter_host_hits"] == 0
    tier.drop(c.ref)
    assert len(tier) == 1
    assert HostTier(max_mb=0).files(store, a) and len(HostTier(max_mb=0)) == 0  # off: nothing kept


def test_weights_that_dont_match_the_manifest_are_refused_and_not_kept(adapters):
    import dataclasses

    store, (a, _, _) = adapters
    forged = dataclasses.replace(a, weights_sha256="0" * 64)
    tier = HostTier(max_mb=16)
    with pytest.raises(AdapterError, match="sha256"):
        tier.files(store, forged)
    assert len(tier) == 0


def test_an_evicted_adapter_comes_back_from_host_memory_with_the_same_answers(adapters):
    """An hf engine with room for one resident adapter: the second load of `a` reads no store file
    and answers as its first load did."""
    import torch

    from ddft.engines.base import GenerateRequest, make_engine

    store, (a, b, _) = adapters
    engine = make_engine("hf", store=store, base_model_id="tiny", cache_size=1)
    ask = lambda m: GenerateRequest("text", "How long do I boil an egg?", None, m, 4)  # noqa: E731
    first = engine.forward_logits([ask(a)])
    engine.forward_logits([ask(b)])  # a is evicted (one resident at most)
    assert engine.loaded_adapters() == [b.ref]
    reads = CountingStore.reads
    again = engine.forward_logits([ask(a)])
    assert CountingStore.reads == reads and engine.stats()["adapter_host_hits"] == 1
    assert engine.stats()["adapter_loads"] == 3
    torch.testing.assert_close(again, first, rtol=0, atol=1e-6)
    assert engine.evict_adapter(a.ref) and len(engine.host) == 1  # deleted: out of both tiers
