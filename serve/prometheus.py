"""Prometheus metrics of the gateway (GET /metrics).

Requests, latency and tokens are counted here by endpoint, adapter and modality (tenants'
adapters by an opaque hash: adapter_label). The engines'
adapter counters (loads, hits, misses, evictions) come back with every answer from a model
replica; the latest snapshot of each replica is kept and summed, so the totals survive a
replica being replaced (its last snapshot stays counted).
"""

import hashlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from ddft.adapters.ref import tenant_of

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENGINE_COUNTERS = {
    "adapter_loads": "adapters loaded into a replica's cache",
    "adapter_hits": "requests whose adapter was already resident",
    "adapter_misses": "requests whose adapter had to be loaded",
    "adapter_evictions": "adapters evicted from a replica's cache (LRU or deleted)",
    "adapter_host_hits": "adapter loads served from a replica's host-memory tier, not the store",
}


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

    def collect(self):
        for name, help_text in ENGINE_COUNTERS.items():
            family = CounterMetricFamily(f"ddft_{name}", help_text)
            family.add_metric([], float(sum(s.get(name, 0) for s in self.snapshots.values())))
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
        self.engines = _EngineCollector()
        r.register(self.engines)

    def observe(self, endpoint: str, modality: str, adapter: str | None, status: int, seconds: float) -> None:
        adapter = adapter_label(adapter)
        self.requests.labels(endpoint, modality, adapter, str(status)).inc()
        self.latency.labels(endpoint, modality, adapter).observe(seconds)

    def count_tokens(self, modality: str, adapter: str | None, prompt: int, completion: int) -> None:
        self.tokens.labels(modality, adapter_label(adapter), "prompt").inc(prompt)
        self.tokens.labels(modality, adapter_label(adapter), "completion").inc(completion)

    def replica_stats(self, replica: str, stats: dict) -> None:
        self.engines.snapshots[replica] = stats

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
