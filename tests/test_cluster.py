"""Two Ray nodes (tests/cluster_fixture.py) with the store on the S3 endpoint (moto, on the wire), so
no node reads another's disk:

- the three training jobs spread over both nodes, each publishing to the bucket;
- a job whose node is lost (its raylet SIGKILLed) resumes from its last checkpoint on the other
  node and ends with the uninterrupted run's weights;
- Serve replicas run on both nodes; losing one under load loses no request (each is answered, or
  refused with 503 + Retry-After to retry), the survivor serves an adapter trained on the lost node,
  and the replica comes back when a node does.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml
from safetensors.torch import load_file

from ddft.adapters.files import WEIGHTS
from ddft.adapters.registry import download, read_manifest
from ddft.config import PipelineConfig, validate
from ddft.store import Store
from tests.cluster_fixture import HEAD_RESOURCE, REPO, two_nodes, wait_until
from tests.pipeline_fixture import registered_checkpoint, tiny_config
from tests.serve_fixture import ADMIN_KEY, free_port

# the module fixtures start two nodes, prepare and train (about 2 min here): the first test carries them
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]
JOBS = ("image", "video", "text")


@pytest.fixture(scope="module")
def cluster():
    yield from two_nodes()


@pytest.fixture(scope="module")
def setup(cluster, s3_endpoint, tmp_path_factory):
    """(config, its YAML path, store): three jobs that can't share a node (1.5 of a node's 2 CPUs
    each), and an app of two model replicas, at most one per node, its gateway on the head."""
    bucket = s3_endpoint.create_bucket("ddft-cluster")
    doc = tiny_config(f"s3://{bucket}/store", steps=8, **s3_endpoint.creds()).model_dump(mode="json")
    for job in doc["jobs"]:
        job["resources"]["cpus_per_worker"] = 1.5
        job["optim"]["checkpoint_every"] = 2
        job["lora"]["dropout"] = 0.1  # so the resumed run must restore the random streams too
    doc["serve"] = {
        "port": free_port(),
        "max_new_tokens": 4,
        "num_replicas": 2,
        "cpus_per_replica": 1,
        "placement": {
            "max_replicas_per_node": 1,
            "gateway_resources": {HEAD_RESOURCE: 0.01},
            "proxy_location": "HeadOnly",  # one HTTP port on one machine
        },
    }
    cfg = validate(PipelineConfig, doc)
    path = tmp_path_factory.mktemp("cluster") / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    cluster.entrypoint("prepare_data.py", path, timeout=400)
    return cfg, path, Store.from_config(cfg.store)


@pytest.fixture(scope="module")
def spread(cluster, setup):
    """train_all over the three jobs, as `ray job submit` runs it: {job: JobResult}."""
    from ddft.train.launcher import read_results

    _, path, store = setup
    started = time.time()
    cluster.entrypoint("train_all.py", path, timeout=600)
    return read_results(store, list(JOBS), since=started)


def test_the_training_jobs_spread_over_both_nodes(cluster, setup, spread):
    _, _, store = setup
    nodes = cluster.nodes()
    assert {r.status for r in spread.values()} == {"succeeded"} and len(spread) == 3
    ran_on = {r.nodes[0] for r in spread.values()}
    assert ran_on == {*nodes["head"], *nodes["worker"]}, (ran_on, nodes)
    for name, r in spread.items():
        assert r.steps == 8 and r.adapter == store.url(read_manifest(store, "ddft", name).key)
        assert r.adapter.startswith("s3://")


HOLD_THE_HEAD = f"""
import sys, ray
ray.init(logging_level="ERROR")
@ray.remote(num_cpus=2, resources={{"{HEAD_RESOURCE}": 0.01}})
class Hold:
    def ready(self):
        return True
hold = Hold.remote()
ray.get(hold.ready.remote())
print("held", flush=True)
sys.stdin.read()  # until the test kills this driver: its actor (and the head's CPUs) go with it
"""


def test_a_job_whose_node_is_lost_resumes_on_the_other_node_with_the_same_weights(cluster, setup, spread, tmp_path):
    from ddft.data.prepare import latest_version
    from ddft.models.info import base_info
    from ddft.train.job import job_fingerprint, run_name
    from ddft.train.launcher import read_results

    cfg, _, store = setup
    video = cfg.job("video")  # trained uninterrupted by `spread`: the reference weights
    moved = video.model_copy(
        update={"name": "video-moved", "resources": video.resources.model_copy(update={"cpus_per_worker": 1.0})}
    )
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(cfg.model_copy(update={"jobs": [moved]}).model_dump(mode="json")))
    run = run_name(moved, job_fingerprint(moved, {"video": latest_version(store, "video")}, base_info(store, "tiny")))
    before = cluster.nodes()

    # The head's CPUs are held, so the job's data and worker start on the worker node; the hold
    # ends when that node is lost, and the job has only the head to go on.
    hold = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_HEAD], env=cluster.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    started = time.time()
    train = None
    try:
        assert hold.stdout.readline().strip() == b"held"
        train = subprocess.Popen(
            [sys.executable, str(REPO / "jobs/train_all.py"), "--config", str(path)],
            env=cluster.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(
            f"a registered checkpoint of {run}",
            lambda: train.poll() is not None or registered_checkpoint(store, run),
            timeout=600,
            every=0.3,
        )
        assert train.poll() is None, "the job ended before its node could be lost"
        cluster.kill_worker()
        hold.kill()
        stdout, stderr = train.communicate(timeout=900)
    finally:
        hold.kill()
        if train is not None:
            train.kill()
        cluster.start_worker()  # a node comes back, as a replaced pod would: the next test needs two
    assert train.returncode == 0, stdout[-3000:] + stderr[-3000:]
    result = read_results(store, ["video-moved"], since=started)["video-moved"]
    assert result.status == "succeeded" and result.steps == 8
    (at,) = result.resumed_from
    assert at in (2, 4, 6), at
    assert result.nodes == [*before["worker"], *before["head"]], (result.nodes, before)
    reference, resumed = (read_manifest(store, "ddft", n) for n in ("video", "video-moved"))
    a, b = (load_file(download(store, m, tmp_path / m.name) / WEIGHTS) for m in (reference, resumed))
    assert a.keys() == b.keys() and len(a) > 4
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def _requests(store: Store) -> dict[str, tuple[str, dict]]:
    """One small request per modality: (route, JSON body), media from the kitchen in the bucket."""
    raw = store.list("datasets/raw/")
    video = next(k for k in raw if k.endswith(".mp4"))
    image = next(k for k in raw if k.lower().endswith((".jpg", ".jpeg", ".png")))
    return {
        "text": ("/v1/generate", {"modality": "text", "question": "How long do I boil an egg?"}),
        "image": ("/v1/generate", {"modality": "image", "image_uri": image}),
        "video": ("/v1/recipes", {"video_uri": video}),
    }


def _replica_nodes(url: str, tries: int = 12) -> set[str]:
    """The nodes of the model replicas that answer /healthz (each call goes to one of them)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    nodes = set()
    for _ in range(tries):
        r = requests.get(f"{url}/healthz", headers=admin, timeout=30)
        if r.status_code == 200:
            nodes.add(r.json()["node"])
    return nodes


def test_serving_spreads_over_both_nodes_and_loses_no_request_when_one_is_lost(cluster, setup, spread):
    _, path, store = setup
    url = cluster.python(
        f"""
        import json
        from serve.app import run
        print(json.dumps(run({str(path)!r})))
        """,
        timeout=600,
        DDFT_ADMIN_KEY=ADMIN_KEY,
    )
    nodes = cluster.nodes()
    head, (worker,) = nodes["head"][0], nodes["worker"]
    wait_until("a model replica on each node", lambda: _replica_nodes(url) == {head, worker}, timeout=240)
    # the adapters trained on a worker node (test_a_job_whose_node... replaced the one they ran on)
    on_worker = [m for m, r in spread.items() if r.nodes[0] != head]
    assert on_worker, spread

    # Load: clients cycle through the modalities; the worker node is lost in the middle.
    bodies = _requests(store)
    outcomes: list[tuple[float, str, int | str, str | None]] = []  # (time, modality, status, Retry-After)
    stop = threading.Event()

    def client(i: int) -> None:
        n = i
        while not stop.is_set():
            modality = JOBS[n % 3]
            route, body = bodies[modality]
            try:
                r = requests.post(url + route, json=body, timeout=180)
                outcomes.append((time.time(), modality, r.status_code, r.headers.get("Retry-After")))
            except requests.RequestException as err:
                outcomes.append((time.time(), modality, type(err).__name__, None))
            n += 1

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, i) for i in range(4)]
        try:
            wait_until("answers before the loss", lambda: sum(o[2] == 200 for o in outcomes) >= 6, timeout=300)
            lost_at = time.time()
            cluster.kill_worker()
            wait_until(
                "answers of every modality after the loss",
                lambda: {o[1] for o in outcomes if o[0] > lost_at + 10 and o[2] == 200} == set(JOBS),
                timeout=300,
            )
        finally:
            stop.set()
        for c in clients:
            c.result(timeout=400)

    statuses = [o[2] for o in outcomes]
    after = [o[2] for o in outcomes if o[0] > lost_at]
    print(
        f"under load: {len(statuses)} requests, {statuses.count(200)} answered, {statuses.count(503)} 503;"
        f" after the loss {after.count(200)} answered, {after.count(503)} 503"
    )
    assert set(statuses) <= {200, 503}, [o for o in outcomes if o[2] not in (200, 503)]
    assert all(o[3] for o in outcomes if o[2] == 503), "a 503 without Retry-After"
    assert statuses.count(200) >= 9, outcomes
    # The survivor (the one replica left) holds the adapters trained on the lost node.
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    info = requests.get(f"{url}/healthz", headers=admin, timeout=30).json()
    assert info["node"] == head, info
    assert {f"ddft/{m}/v1" for m in on_worker} <= set(info["loaded_adapters"]), info

    # A node comes back (test_a_job_whose_node... restarts one the same way): so does the replica.
    cluster.start_worker()
    (worker2,) = cluster.nodes()["worker"]
    wait_until("the replica back on the new node", lambda: _replica_nodes(url) == {head, worker2}, timeout=300)
    route, body = bodies["video"]
    assert requests.post(url + route, json=body, timeout=180).status_code == 200
