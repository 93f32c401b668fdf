"""The second tier of an engine's adapters: their checked files in host memory (LoRAX's CPU tier).

The engine's LRU (lru.py) holds what is resident where requests run (stacked LoRA slots, vLLM's
LoRA slots); this tier, bounded in bytes and larger, keeps every adapter fetched lately, resident or
not. An adapter the LRU evicted and a request wants again comes from here: no store round trip
(S3, for a cluster) and no hash of its weights, only the engine's own load. An adapter deleted by
its owner leaves both tiers at once (`AdapterCache.evict_adapter`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from ddft.engines.lru import adapter_key

if TYPE_CHECKING:
    from ddft.adapters.registry import Manifest
    from ddft.store import Store

HOST_COUNTERS = ("adapter_host_hits",)


class HostTier:
    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)  # 0: off (every load reads the store)
        # key -> (manifest, files by name, their bytes), oldest first
        self._files: OrderedDict[str, tuple[Manifest, dict[str, bytes], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # loads run in worker threads; the gateway's deletes in others
        self.counters = dict.fromkeys(HOST_COUNTERS, 0)

    def files(self, store: Store, manifest: Manifest) -> dict[str, bytes]:
        """The adapter's files by name, checked against its manifest: from memory, else the store."""
        from ddft.adapters.registry import fetch

        key = adapter_key(manifest)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                self.counters = {**self.counters, "adapter_host_hits": self.counters["adapter_host_hits"] + 1}
                return self._files[key][1]
        files = fetch(store, manifest)  # outside the lock: a slow store never blocks a hit
        size = sum(map(len, files.values()))
        with self._lock:
            if key not in self._files and size <= self.max_bytes:
                self._files[key] = (manifest, files, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    self._bytes -= self._files.popitem(last=False)[1][2]
        return files

    def download(self, store: Store, manifest: Manifest, local_dir: Path) -> Path:
        """The adapter's files written into `local_dir` (for loaders that read a folder)."""
        from ddft.adapters.registry import write_files

        return write_files(self.files(store, manifest), local_dir)

    def drop(self, ref: str) -> None:
        """Forget every version of `ref` (its owner deleted it)."""
        with self._lock:
            for key in [k for k, (m, _, _) in self._files.items() if m.ref == ref]:
                self._bytes -= self._files.pop(key)[2]

    def __len__(self) -> int:
        return len(self._files)
