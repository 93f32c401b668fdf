"""The one adapter LRU both engines use: which adapters are resident, in what order, which may not
go (a running batch's, a request's in flight), and the counters /metrics reads.

An engine gives it `load` (manifest -> its own entry: PEFT's adapter name, vLLM's LoRA folder) and
`unload` (free that entry's memory). Callers hold their engine's lock around every call that
changes it; what readers use (`resident`, `counters`) is replaced whole, never mutated, so health
checks and /metrics read it from any thread without waiting for a batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Generic, TypeVar

from ddft.adapters.ref import module_key

if TYPE_CHECKING:
    from ddft.adapters.registry import Manifest

E = TypeVar("E")
COUNTERS = ("adapter_loads", "adapter_hits", "adapter_misses", "adapter_evictions")


adapter_key = module_key  # one resident adapter's key (adapters/ref.py), safe as a PEFT adapter name


class AdapterLRU(Generic[E]):
    def __init__(self, size: int, load: Callable[[Manifest], E], unload: Callable[[Manifest, E], None]):
        if size < 1:
            raise ValueError(f"cache_size is {size}; it must be at least 1")
        self.size, self._load, self._unload = size, load, unload
        self._entries: OrderedDict[str, tuple[Manifest, E]] = OrderedDict()  # least recently used first
        self._holds: dict[str, int] = {}  # requests using an adapter now: never evicted while held
        self._prefetched: set[str] = set()  # loaded ahead of their request, which counted its miss
        self.resident: tuple[Manifest, ...] = ()
        self.counters = dict.fromkeys(COUNTERS, 0)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, manifest: Manifest) -> bool:
        return adapter_key(manifest) in self._entries

    def acquire(
        self, manifest: Manifest, pinned: Collection[str] = (), hold: bool = False, prefetch: bool = False
    ) -> E:
        """The adapter's entry, loaded if it isn't resident (its error raised, nothing kept), made the
        most recent; then the least recent beyond `size` go, never one in `pinned` (keys) or held.
        `hold`: keep it until `release` (a request in flight). `prefetch`: loaded ahead of the request
        that will acquire it (Serve's multiplexed loader): each request counts one hit or one miss."""
        key = adapter_key(manifest)
        if key in self._entries:
            if not prefetch and key in self._prefetched:
                self._prefetched.discard(key)  # its request: the miss was counted when it loaded
            elif not prefetch:
                self._count("adapter_hits")
            self._entries.move_to_end(key)
        else:
            self._count("adapter_misses")
            self._entries[key] = (manifest, self._load(manifest))
            self._count("adapter_loads")
            if prefetch:
                self._prefetched.add(key)
        if hold:
            self._holds[key] = self._holds.get(key, 0) + 1
        entry = self._entries[key][1]
        self._evict(set(pinned) | {key})
        return entry

    def release(self, manifest: Manifest) -> None:
        """A request that held the adapter is done; it may go now if the cache is over size."""
        key = adapter_key(manifest)
        left = self._holds.get(key, 0) - 1
        if left > 0:
            self._holds[key] = left
        else:
            self._holds.pop(key, None)
        self._evict(set())

    def evict(self, ref: str) -> bool:
        """Drop every resident version of `ref` not in use (its owner deleted it); False if none went."""
        gone = [k for k, (m, _) in self._entries.items() if m.ref == ref and not self._holds.get(k)]
        for key in gone:
            self._drop(key, "asked")
        self._publish()
        return bool(gone)

    def _evict(self, keep: set[str]) -> None:
        for key in list(self._entries):
            if len(self._entries) <= self.size:
                break
            if key not in keep and not self._holds.get(key):
                self._drop(key, "LRU")
        self._publish()

    def _drop(self, key: str, why: str) -> None:
        manifest, entry = self._entries.pop(key)
        self._prefetched.discard(key)
        self._count("adapter_evictions")
        self._unload(manifest, entry)

    def _publish(self) -> None:
        self.resident = tuple(m for m, _ in self._entries.values())

    def _count(self, name: str) -> None:
        self.counters = {**self.counters, name: self.counters[name] + 1}
