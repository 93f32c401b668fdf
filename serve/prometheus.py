"""Prometheus metrics of the gateway (GET /metrics).

Requests, latency and tokens are counted here by endpoint, adapter and modality (tenants'
adapters by an opaque hash: adapter_label). The engine figures have the same names on both
engines: time to first token, time per output token and queue wait are observed from each answer's
timings (engines/base.py names them), by engine, modality and adapter; the engines' adapter
counters (loads, hits, misses, evictions) and gauges (running and waiting rows, KV-cache use) come
back with every answer from a model replica, and a scrape asks a replica for fresh ones. The latest
snapshot of each replica is kept: counters are summed, so totals survive a replica being replaced
(its last snapshot stays counted); gauges are per replica, and a replica not heard from in
GAUGE_TTL_S drops out of them.
"""

import hashlib
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ddft.adapters.ref import tenant_of

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENGINE_COUNTERS = {
    "adapter_loads": "adapters loaded into a replica's cache",
    "adapter_hits": "requests whose adapter was already resident",
    "adapter_misses": "requests whose adapter had to be loaded",
    "adapter_evictions": "adapters evicted from a replica's cache (LRU or deleted)",
    "adapter_host_hits": "adapter loads served from a replica's host-memory tier, not the store",
}

ENGINE_GAUGES = {  # engines.base.FIGURES
    "running_rows": "rows (requests) a replica's engine is generating now",
    "waiting_rows": "requests waiting in a replica's engine for a free row",
    "cache_tokens": "KV-cache tokens the running rows hold",
    "cache_usage": "share of the KV cache in use (hf: of serve.max_cached_tokens; vllm: of its blocks)",
}
GAUGE_TTL_S = 300.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


def adapter_label(ref: str | None) -> str:
    """How /metrics names an adapter: the platform's by ref; a tenant's by an opaque hash of its ref
    ("tenant:<12 hex>"), so an anonymous scrape learns no tenant's names. The owner finds theirs
    by hashing their ref the same way."""
    if not ref:
        return "base"
    if tenant_of(ref.split("/")[0]) is not None:
        return "tenant:" + hashlib.sha256(ref.encode()).hexdigest()[:12]
    return ref


class _EngineCollector:
    def __init__(self):
        self.snapshots: dict[str, dict] = {}  # replica id -> engine.stats()
        self.heard: dict[str, float] = {}  # replica id -> when its snapshot came (monotonic)

    def collect(self):
        for name, help_text in ENGINE_COUNTERS.items():
            family = CounterMetricFamily(f"ddft_{name}", help_text)
            family.add_metric([], float(sum(s.get(name, 0) for s in self.snapshots.values())))
            yield family
        now = time.monotonic()
        live = {r: s for r, s in self.snapshots.items() if now - self.heard.get(r, now) <= GAUGE_TTL_S}
        for name, help_text in ENGINE_GAUGES.items():
            family = GaugeMetricFamily(f"ddft_engine_{name}", help_text, labels=["replica"])
            for replica, stats in sorted(live.items()):
                family.add_metric([replica], float(stats.get(name, 0)))
            yield family


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["endpoint", "modality", "adapter"]
        self.requests = Counter("ddft_requests", "HTTP requests answered", labels + ["status"], registry=r)
        self.latency = Histogram(
            "ddft_request_latency_seconds",
            "time to answer a request",
            labels,
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.tokens = Counter("ddft_tokens", "tokens processed", ["modality", "adapter", "kind"], registry=r)
        self.queue_depth = Gauge("ddft_queue_depth", "requests waiting for or running on a model replica", registry=r)
        self.uploads = Counter("ddft_adapter_uploads", "tenant adapter uploads", ["status"], registry=r)
        engine = ["engine", "modality", "adapter"]
        self.ttft = Histogram(
            "ddft_engine_time_to_first_token_seconds",
            "from a request's arrival at its replica's engine to its first token",
            engine,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "ddft_engine_time_per_output_token_seconds",
            "a request's mean time between its tokens after the first (inter-token latency)",
            engine,
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.queue_wait = Histogram(
            "ddft_engine_queue_wait_seconds",
            "time a request waited in its replica's engine before its prefill",
            ["engine", "modality"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.engines = _EngineCollector()
        r.register(self.engines)

    def observe(self, endpoint: str, modality: str, adapter: str | None, status: int, seconds: float) -> None:
        adapter = adapter_label(adapter)
        self.requests.labels(endpoint, modality, adapter, str(status)).inc()
        self.latency.labels(endpoint, modality, adapter).observe(seconds)

    def count_tokens(self, modality: str, adapter: str | None, prompt: int, completion: int) -> None:
        self.tokens.labels(modality, adapter_label(adapter), "prompt").inc(prompt)
        self.tokens.labels(modality, adapter_label(adapter), "completion").inc(completion)

    def engine_timings(self, modality: str, adapter: str | None, timings: dict) -> None:
        """One answer's engine timings (engines/base.py: first_token_s, decode_s, queue_s, new_tokens)."""
        engine = str(timings.get("engine", "hf"))
        labels = (engine, modality, adapter_label(adapter))
        if "first_token_s" in timings:
            self.ttft.labels(*labels).observe(float(timings["first_token_s"]))
        if "decode_s" in timings and int(timings.get("new_tokens", 0)) > 1:
            self.tpot.labels(*labels).observe(float(timings["decode_s"]) / (int(timings["new_tokens"]) - 1))
        if "queue_s" in timings:
            self.queue_wait.labels(engine, modality).observe(float(timings["queue_s"]))

    def replica_stats(self, replica: str, stats: dict) -> None:
        self.engines.snapshots[replica] = stats
        self.engines.heard[replica] = time.monotonic()

    def render(self) -> bytes:
        return generate_latest(self.registry)


_metrics: Metrics | None = None


def get() -> Metrics:
    """The process's metrics. Callers go through this module (pickled by reference), not a global
    of their own: Serve ships the ingress class by value, and a copied global would be a second,
    unseen set of counters."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics
