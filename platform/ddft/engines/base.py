"""The Engine protocol: a base model answering requests, each with its own adapter.

An engine holds one base and loads adapters on demand. Its serving interface is one typed, async,
streaming call: `stream(request)` is an async iterator of `Chunk`s (new text as it is generated,
the whole `GenerateResult` on the last one); the engine batches concurrent streams itself: both
schedule per step, a request joining the running rows at the next step and leaving at its end
(`hf`: engines/scheduler.py; `vllm`: vLLM's own scheduler). `EngineBase` below is what both share.
Errors are raised as typed exceptions (`ValueError` for a bad request, `AdapterError`, `StoreError`,
`EngineUnavailable`, `EngineBusy`) and only `serve/` maps them to HTTP. `generate(list)` answers
a whole batch synchronously (evaluation, benchmarks). Engines are imported lazily by
`make_engine`, so heavy or optional ones (vLLM) cost nothing until chosen.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ddft.engines.detok import first_stop, token_text
from ddft.engines.host_tier import HOST_COUNTERS, HostTier
from ddft.engines.lru import COUNTERS, AdapterLRU
from ddft.errors import Unavailable

if TYPE_CHECKING:
    import numpy as np

    from ddft.adapters.registry import Manifest
    from ddft.config import ServeConfig
    from ddft.engines.grammar import Constraint
    from ddft.prompts import Turn
    from ddft.store import Store

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs bound; vLLM's default)


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
    top_p: float = 1.0  # sampled rows draw from the smallest set of tokens whose probability reaches top_p
    # None: no log-probabilities; k >= 0: each new token's, with the k likeliest alternatives (at most
    # MAX_LOGPROBS), from the model's own distribution (before temperature, top_p or a grammar: vLLM's raw)
    logprobs: int | None = None
    history: list[Turn] = field(default_factory=list)  # a chat's earlier turns, before the question


@dataclass
class TokenLogprob:
    """A generated token's log-probability; `top` the likeliest tokens at that step (each with an
    empty `top`), most likely first."""

    token_id: int
    token: str  # the token's own text (a piece of a character when it splits one)
    logprob: float
    top: list[TokenLogprob] = field(default_factory=list)


def token_logprob(tokenizer, token_id: int, logprob: float, top: Iterable[tuple[int, float]] = ()) -> TokenLogprob:
    """A TokenLogprob with its alternatives `top` ((id, logprob), most likely first), each token's
    text as both engines write it (detok.token_text)."""
    return TokenLogprob(
        int(token_id),
        token_text(tokenizer, token_id),
        float(logprob),
        [TokenLogprob(int(t), token_text(tokenizer, t), float(lp)) for t, lp in top],
    )


@dataclass
class GenerateResult:
    text: str
    adapter: str | None  # the adapter's ref ("ddft/video/v1"), None for the base
    base: str  # the base model id
    finish_reason: str = "length"  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens)
    # seconds and counts, the same keys on both engines: queue_s (waiting before its prefill),
    # first_token_s (arrival at the engine -> first token), decode_s (first -> last token),
    # generate_s, adapter_load_s, prompt_tokens, new_tokens, engine; hf adds batch_size and
    # adapters_in_batch (the most rows and distinct adapters that shared a step with it)
    timings: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)  # the generated tokens (no end-of-sequence token)
    logprobs: list[TokenLogprob] | None = None  # one per token of the text (request.logprobs set)


@dataclass
class Chunk:
    """One step of a streamed answer: the text generated since the previous chunk.

    The last chunk of a stream has `finish_reason` set and carries the whole `result` (the same
    text as the deltas joined, stripped; adapter, base, timings); earlier ones have `result` None.
    """

    text: str  # new text since the previous chunk (may be "")
    token_ids: list[int] = field(default_factory=list)  # the new tokens behind it
    logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs (request.logprobs set)
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

    def stats(self) -> dict[str, float]:
        """Counters since start (STATS: adapter loads, hits, misses, evictions, requests, tokens)
        and the gauges now (FIGURES: running and waiting rows, cache use), for /metrics."""


ENGINE_STATS = ("requests", "prompt_tokens", "new_tokens")  # counted by the engine; the adapter ones by its LRU
STATS = COUNTERS + HOST_COUNTERS + ENGINE_STATS  # the counters every engine's stats() returns
# the gauges too (engine figures on /metrics): rows running and waiting, KV-cache tokens and the share used
FIGURES = ("running_rows", "waiting_rows", "cache_tokens", "cache_usage")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class EngineBusy(Unavailable):
    """The engine's waiting queue is full: retry later (503 + Retry-After)."""

    default_code = "engine_busy"


class EngineBase:
    """What both engines own: the store, the base's identity, the adapters' LRU (engines/lru.py) and
    host tier, the lock and the counters; a request checked once (`check_request`) and a result
    finished once (`finish`). They differ in how they schedule rows and load an adapter (`_load`,
    `_unload`). Counters and figures are read without the lock, so health checks and /metrics never
    wait for a running step."""

    def __init__(self, store: Store | str, base_model_id: str, cache_size: int, host_cache_mb: float):
        from ddft.models.load import base_info
        from ddft.store import Store

        self.store = store if isinstance(store, Store) else Store(store)
        self.base_id = base_model_id
        self.info = base_info(self.store, base_model_id)  # a missing base: the store's "not in the store"
        self.adapters = AdapterLRU(cache_size, self._load, self._unload)
        self.host = HostTier(host_cache_mb)  # the adapters' files in host memory, resident or not
        self._lock = threading.RLock()  # adapter loads, and the steps that use them
        self._stats = dict.fromkeys(ENGINE_STATS, 0)

    def _load(self, manifest: Manifest):
        raise NotImplementedError

    def _unload(self, manifest: Manifest, entry) -> None:
        raise NotImplementedError

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

    def figures(self) -> dict[str, float]:
        """The engine's gauges now (FIGURES)."""
        return dict.fromkeys(FIGURES, 0)

    def stats(self) -> dict[str, float]:
        return {**self._stats, **self.adapters.counters, **self.host.counters, **self.figures()}

    def finish(
        self,
        request: GenerateRequest,
        tokens: list[int],
        reason: str,
        prompt_tokens: int,
        timings: dict,
        logprobs: list[TokenLogprob] | None = None,
    ) -> GenerateResult:
        """A request's result from its new tokens (no end of sequence) and their logprobs (one per
        token): the text decoded as training decodes it, cut at its first stop string and stripped;
        counted."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = first_stop(text, request.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        for key, n in (("requests", 1), ("prompt_tokens", prompt_tokens), ("new_tokens", len(tokens))):
            self._stats[key] += n
        return GenerateResult(
            text=text.strip(),
            adapter=request.adapter.ref if request.adapter else None,
            base=self.base_id,
            finish_reason=reason,
            timings={**timings, "prompt_tokens": int(prompt_tokens), "new_tokens": len(tokens)},
            token_ids=list(tokens),
            logprobs=list(logprobs or []) if request.logprobs is not None else None,
        )


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
    if not 0 < r.top_p <= 1:
        raise ValueError(f"{where}top_p is {r.top_p}; use a number above 0, at most 1")
    if r.logprobs is not None and not 0 <= r.logprobs <= MAX_LOGPROBS:
        raise ValueError(f"{where}logprobs is {r.logprobs}; use None or 0 to {MAX_LOGPROBS} alternatives")
    if r.history:
        from ddft.prompts import ROLES, Turn

        if r.raw:
            raise ValueError(f"{where}a raw prompt has no earlier turns")
        for t in r.history:
            if not isinstance(t, Turn) or t.role not in ROLES or not isinstance(t.text, str):
                raise ValueError(f"{where}history holds {t!r}; each turn is a ddft.prompts.Turn of role {ROLES}")
        if sum(t.media for t in r.history) > 1 or (r.modality == "text" and any(t.media for t in r.history)):
            raise ValueError(f"{where}at most one turn carries the medium, and only for an image or video request")
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
            "dtype": s.torch_dtype,
            "max_batch_size": s.max_batch_size,
            "max_cached_tokens": s.max_cached_tokens,
        }
    # tenant uploads are capped at serve.max_lora_rank; the platform's adapters have their jobs' ranks
    jobs = cfg.jobs if isinstance(cfg, TrainConfig) else []
    need = max([s.max_lora_rank, *adapter_ranks] + [j.lora.r for j in jobs])
    rank = next((r for r in LORA_RANKS if r >= need), LORA_RANKS[-1])
    v = s.vllm
    return {
        "cache_size": s.adapter_cache_size,
        "host_cache_mb": s.host_cache_mb,
        "max_lora_rank": rank,
        "max_loras": min(v.max_loras, s.adapter_cache_size),
        "dtype": s.torch_dtype,
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
