"""Adapter affinity: with two model replicas, Serve's multiplexing sends every request for an
adapter to the replica that already holds it (one multiplexed id on both sides: the gateway asks
for the id the replica registers). Counted in /metrics: each adapter is loaded exactly once."""

from __future__ import annotations

import random
import time

import pytest
import requests

from tests.serve_fixture import running_app

pytestmark = pytest.mark.integration


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_each_adapters_requests_land_on_the_replica_that_holds_it(ray_cluster, tmp_path):
    from ddft.models.load import base_info
    from tests.test_engine_hf import make_adapter

    with running_app(tmp_path, num_replicas=2, cpus_per_replica=0.5) as app:
        base = base_info(app.store, "tiny")
        for seed, name in ((7, "mine"), (8, "other")):  # acme's own text adapters, besides tenant-acme/text
            make_adapter(app.store, base, "text", seed, tmp_path, name=name, owner="tenant-acme")
        refs = ["ddft/text/v1", "tenant-acme/text/v1", "tenant-acme/mine/v1", "tenant-acme/other/v1"]
        order = [r for r in refs for _ in range(6)]
        random.Random(0).shuffle(order)
        acme = {"Authorization": f"Bearer {app.keys['acme']}"}
        seen = set()
        for ref in order:  # one at a time: no replica is ever too busy to take its own adapter's request
            body = {"modality": "text", "question": "Boil an egg?", "adapter": ref, "max_new_tokens": 2}
            answer = requests.post(f"{app.url}/v1/generate", json=body, headers=acme, timeout=120)
            assert answer.status_code == 200 and answer.json()["adapter"] == ref, answer.text
            if ref not in seen:
                # A replica tells Serve what it holds every 0.1 s and Serve passes it on to the
                # routers: a request sent before that lands anywhere (measured: 1 load in 5 then).
                seen.add(ref)
                time.sleep(2)
        metrics = requests.get(f"{app.url}/metrics", timeout=60).text
        loads, hits = _metric(metrics, "ddft_adapter_loads_total"), _metric(metrics, "ddft_adapter_hits_total")
        # every adapter loaded once, on one replica; every later request found it where it was sent
        assert loads == len(refs), metrics
        assert hits >= len(order) - len(refs), metrics
