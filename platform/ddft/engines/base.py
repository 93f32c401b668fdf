"""The Engine protocol: a base model answering requests, each with its own adapter.

An engine holds one base and loads adapters on demand. Its serving interface is one typed, async,
streaming call: `stream(request)` is an async iterator of `Chunk`s (new text as it is generated,
the whole `GenerateResult` on the last one); the engine batches concurrent streams itself (the
`hf` engine forms a batch when it is free, `vllm` joins a request to the running batch at the next
step). Errors are raised as typed exceptions (`ValueError` for a bad request, `AdapterError`,
`StoreError`, `EngineUnavailable`) and only `serve/` maps them to HTTP. `generate(list)` answers
a whole batch synchronously (evaluation, benchmarks). Engines are imported lazily by
`make_engine`, so heavy or optional ones (vLLM) cost nothing until chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ddft.engines.host_tier import HOST_COUNTERS, HostTier
from ddft.engines.lru import COUNTERS, AdapterLRU
from ddft.errors import Unavailable

if TYPE_CHECKING:
    import numpy as np

    from ddft.adapters.registry import Manifest
    from ddft.config import ServeConfig
    from ddft.engines.grammar import Constraint


@dataclass
class GenerateRequest:
    modality: str  # "image" | "video" | "text"
    question: str
    pixels: np.ndarray | None = None  # (H, W, 3) uint8 for an image, (T, H, W, 3) for a video
    adapter: Manifest | None = None  # None: the base answers
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0: greedy
    stop: list[str] = field(default_factory=list)  # generation ends at the first of these (not returned)
    seed: int | None = None  # sampled decoding is reproducible with a seed
    raw: bool = False  # text only: the question is the whole prompt, no chat template (/v1/completions)
    constraint: Constraint | None = None  # the answer must match it (grammar.py): a grammar or a JSON Schema


@dataclass
class GenerateResult:
    text: str
    adapter: str | None  # the adapter's ref ("ddft/video/v1"), None for the base
    base: str  # the base model id
    finish_reason: str = "length"  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens)
    timings: dict[str, Any] = field(default_factory=dict)  # seconds, token counts, batch size
    token_ids: list[int] = field(default_factory=list)  # the generated tokens (no end-of-sequence token)


@dataclass
class Chunk:
    """One step of a streamed answer: the text generated since the previous chunk.

    The last chunk of a stream has `finish_reason` set and carries the whole `result` (the same
    text as the deltas joined, stripped; adapter, base, timings); earlier ones have `result` None.
    """

    text: str  # new text since the previous chunk (may be "")
    token_ids: list[int] = field(default_factory=list)  # the new tokens behind it
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    result: GenerateResult | None = None  # the whole answer, on the last chunk only


class EngineUnavailable(Unavailable):
    """An engine can't start (or went away) here; the message says why and what to use instead."""

    default_code = "engine_unavailable"


@runtime_checkable
class Engine(Protocol):
    base_id: str

    def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Generate one request, batched with whatever else is running; chunks as text is made."""

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Answer every request (in order), each with its own adapter, as one mixed batch."""

    def prepare(self, constraint: Constraint) -> None:
        """Compile a constraint ahead of the requests that use it (the recipe grammar at start)."""

    def load_adapter(self, manifest: Manifest) -> str:
        """Make an adapter resident (evicting the least recently used beyond the cache size)."""

    def prefetch_adapter(self, manifest: Manifest) -> None:
        """Make an adapter resident ahead of its request (which counts its hit or miss)."""

    def evict_adapter(self, ref: str) -> bool:
        """Drop an adapter from memory now (e.g. its owner deleted it); False if it wasn't resident."""

    def loaded_adapters(self) -> list[str]:
        """Refs of the adapters held in memory now, least recently used first."""

    def resident_adapters(self) -> list[Manifest]:
        """The manifests of those adapters, in the same order."""

    def stats(self) -> dict[str, int]:
        """Counters since start: adapter_loads, adapter_hits, adapter_misses, adapter_evictions,
        requests, prompt_tokens, new_tokens (for /metrics)."""


ENGINE_STATS = ("requests", "prompt_tokens", "new_tokens")  # counted by the engine; the adapter ones by its LRU
STATS = COUNTERS + HOST_COUNTERS + ENGINE_STATS  # the counters every engine's stats() returns


class AdapterCache:
    """What engines share: their adapters' LRU (engines/lru.py) and the counters, read without a
    lock so health checks and /metrics never wait for a running batch."""

    adapters: AdapterLRU
    host: HostTier  # the adapters' files in host memory, resident or not (host_tier.py)
    _stats: dict[str, int]  # the engine's own: requests, prompt_tokens, new_tokens

    def loaded_adapters(self) -> list[str]:
        return [m.ref for m in self.adapters.resident]

    def resident_adapters(self) -> list[Manifest]:
        return list(self.adapters.resident)

    def prefetch_adapter(self, manifest: Manifest) -> None:
        """Make an adapter resident ahead of the request that brings it (Serve's multiplexed loader);
        that request, not this call, counts as the adapter's hit or miss."""
        with self._lock:
            self.adapters.acquire(manifest, prefetch=True)

    def evict_adapter(self, ref: str) -> bool:
        """Drop an adapter from memory now (its owner deleted it); False if it wasn't resident."""
        self.host.drop(ref)
        with self._lock:
            return self.adapters.evict(ref)

    def stats(self) -> dict[str, int]:
        return {**self._stats, **self.adapters.counters, **self.host.counters}


def check_request(r: GenerateRequest, i: int | None = None) -> None:
    """What every engine checks before a request loads or joins a batch (ValueError for a bad request,
    AdapterError for an adapter of another modality); `i` names the request in a list."""
    import numpy as np

    from ddft.adapters.registry import check_modality
    from ddft.config import MODALITIES

    where = f"request {i}: " if i is not None else ""
    if r.modality not in MODALITIES:
        raise ValueError(f"{where}modality {r.modality!r}; use one of {list(MODALITIES)}")
    if not r.question or not r.question.strip():
        raise ValueError(f"{where}the question is empty")
    if r.max_new_tokens < 1:
        raise ValueError(f"{where}max_new_tokens is {r.max_new_tokens}; it must be at least 1")
    if r.raw and r.modality != "text":
        raise ValueError(f"{where}a raw prompt is text only; {r.modality} questions go through the chat template")
    if r.temperature < 0:
        raise ValueError(f"{where}temperature is {r.temperature}; use 0 (greedy) or more")
    if not isinstance(r.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in r.stop):
        raise ValueError(f"{where}stop must be a list of non-empty strings, got {r.stop!r}")
    if r.constraint is not None:
        from ddft.engines.grammar import Constraint

        if not isinstance(r.constraint, Constraint):
            raise ValueError(f"{where}constraint must be a ddft.engines.grammar.Constraint, got {r.constraint!r}")
    if r.adapter is not None:
        check_modality(r.adapter, r.modality)
    want = {"image": 3, "video": 4}.get(r.modality)
    if want is None:
        if r.pixels is not None:
            raise ValueError(f"{where}a text request carries no pixels")
    elif not isinstance(r.pixels, np.ndarray) or r.pixels.ndim != want or r.pixels.shape[-1] != 3:
        raise ValueError(
            f"{where}{r.modality} pixels must be a uint8 array shaped "
            f"{'(H, W, 3)' if want == 3 else '(frames, H, W, 3)'}, got {getattr(r.pixels, 'shape', None)}"
        )


ENGINES = {"hf": "ddft.engines.hf:HFEngine", "vllm": "ddft.engines.vllm:VLLMEngine"}


def serve_options(cfg: ServeConfig, engine: str | None = None, adapter_ranks: Iterable[int] = ()) -> dict:
    """The engine keywords a config sets (besides store, base and device), for its serve.engine or
    `engine`: one place for both engines, used by the app and the benchmarks alike. `adapter_ranks`:
    the platform's adapters' (in the store); a whole-loop config adds its jobs' own."""
    from ddft.config import TrainConfig

    s = cfg.serve
    if (engine or s.engine) == "hf":
        return {
            "cache_size": s.adapter_cache_size,
            "host_cache_mb": s.host_cache_mb,
            "max_batch_size": s.max_batch_size,
            "batch_wait_s": s.batch_wait_timeout_s,
        }
    from ddft.engines.vllm import LORA_RANKS  # no vLLM import

    # tenant uploads are capped at serve.max_lora_rank; the platform's adapters have their jobs' ranks
    jobs = cfg.jobs if isinstance(cfg, TrainConfig) else []
    need = max([s.max_lora_rank, *adapter_ranks] + [j.lora.r for j in jobs])
    rank = next((r for r in LORA_RANKS if r >= need), LORA_RANKS[-1])
    v = s.vllm
    return {
        "cache_size": s.adapter_cache_size,
        "host_cache_mb": s.host_cache_mb,
        "max_lora_rank": rank,
        "kv_cache_gib": v.kv_cache_gib,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "max_model_len": v.max_model_len,
        "max_num_seqs": v.max_num_seqs,
    }


def make_engine(kind: str, **kwargs) -> Engine:
    """Build an engine by name, importing its module only now: 'hf' (transformers + PEFT) or
    'vllm' (in vLLM's own environment; it refuses to start, saying why, where it can't)."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}: choose one of {sorted(ENGINES)}")
    module, cls = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
