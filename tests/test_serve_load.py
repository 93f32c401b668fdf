"""A bounded load test over HTTP (127.0.0.1 only): 16 clients for 60 s against the app deployed
from serve/config.yaml (its deployment overrides, two ModelServer replicas), one replica killed
mid-test. Only 503 backpressure may fail a request; the killed replica is replaced and serves."""

from __future__ import annotations

import base64
import random
import threading
import time
from collections import Counter

import pytest
import requests
import yaml

from ddft.models.load import ensure_base
from ddft.store import Store
from tests.serve_fixture import free_port, make_mp4, make_png, write_config
from tests.test_engine_hf import make_adapter
from tests.test_serve import ROOT_CONFIG

CLIENTS, SECONDS, KILL_AT_S = 16, 60, 20


def _deploy_from_serve_yaml(pipeline_yaml: str, port: int) -> None:
    """What `serve deploy serve/config.yaml` does, with the test's pipeline config and two replicas."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(ROOT_CONFIG.read_text())
    doc["http_options"]["port"] = port
    (app,) = doc["applications"]
    app["args"]["config"] = pipeline_yaml
    model = {d["name"]: d for d in app["deployments"]}["ModelServer"]
    model["autoscaling_config"].update(min_replicas=2, initial_replicas=2, max_replicas=2)
    serve_client = serve_start(http_options=doc["http_options"])
    # not _blocking=True: that waits a fixed 60 s, too short for two replicas on a busy 2-core machine
    serve_client.deploy_apps(ServeDeploySchema.model_validate(doc))
    serve_client._wait_for_application_running("ddft", timeout_s=300)


def _kill_one_model_replica() -> str:
    import ray

    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and "ModelServer" in a["name"]
    )
    assert len(names) == 2, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)  # deploy (up to 300 s), 60 s of load, clients' 180 s, the replacement's 120 s
def test_load_with_a_replica_killed(ray_cluster, tmp_path):
    from ray import serve

    store = Store(str(tmp_path / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    for seed, modality in enumerate(("image", "video", "text")):
        make_adapter(store, base, modality, seed, tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mp4, png = make_mp4(), make_png()
    png_b64 = base64.b64encode(png).decode()
    statuses: Counter = Counter()
    bad: list[str] = []
    after_kill_ok = threading.Event()
    killed_at: list[float] = []

    def one(rng: random.Random) -> requests.Response:
        kind = rng.choice(("text", "text", "image", "recipe"))
        if kind == "text":
            return requests.post(
                f"{url}/v1/generate", json={"modality": "text", "question": "Boil an egg?"}, timeout=120
            )
        if kind == "image":
            return requests.post(f"{url}/v1/generate", json={"modality": "image", "image_b64": png_b64}, timeout=120)
        return requests.post(f"{url}/v1/recipes", files={"video": ("v.mp4", mp4)}, timeout=120)

    def worker(i: int) -> None:
        """Records what went wrong in `bad` (the test's thread asserts on it: an assert here would end
        this thread, not fail the test)."""
        rng = random.Random(i)
        while time.monotonic() < stop_at:
            try:
                resp = one(rng)
                statuses[resp.status_code] += 1
                if resp.status_code == 503:
                    retry_after = resp.headers.get("Retry-After")
                    if not retry_after:
                        bad.append(f"client {i}: 503 without Retry-After: {resp.text[:300]}")
                    time.sleep(min(float(retry_after or 1), 1.0))
                elif resp.status_code != 200:
                    bad.append(f"client {i}: {resp.status_code} {resp.text[:300]}")
                elif killed_at and time.monotonic() > killed_at[0] + 1:
                    after_kill_ok.set()
            except Exception as err:  # a refused connection, a bad header: recorded, the client goes on
                bad.append(f"client {i}: {type(err).__name__}: {err}")

    try:  # a failed deploy shuts Serve down too: a Serve left up would keep its port for later tests
        _deploy_from_serve_yaml(write_config(tmp_path, store.uri, port, max_queued_requests=4), port)
        stop_at = time.monotonic() + SECONDS
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(KILL_AT_S)
        killed = _kill_one_model_replica()
        killed_at.append(time.monotonic())
        for t in threads:
            t.join(timeout=max(1.0, stop_at + 180 - time.monotonic()))
        print(f"statuses {dict(statuses)}; killed {killed}")
        assert not [t for t in threads if t.is_alive()], "clients still waiting 180 s after the test's end"
        assert not bad, bad[:5]
        assert statuses[200] > CLIENTS and after_kill_ok.is_set()
        # the controller replaced the killed replica: two ModelServer replicas are running again
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            deployment = serve.status().applications["ddft"].deployments["ModelServer"]
            if deployment.replica_states.get("RUNNING", 0) == 2:
                break
            time.sleep(2)
        assert deployment.replica_states.get("RUNNING", 0) == 2, deployment
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["status"] == "ok"
        ok = requests.post(f"{url}/v1/generate", json={"modality": "text", "question": "Still there?"}, timeout=120)
        assert ok.status_code == 200 and ok.json()["adapter"] == "ddft/text/v1"
    finally:
        serve.shutdown()
