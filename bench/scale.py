"""make bench-scale: many adapters and tenants (issue 15), in one run.

  registry  --adapters tenant adapters (default 5,000) over --tenants tenants (50; the first holds
            --big of them, 1,000) and the platform's three, in a store on an S3 endpoint over HTTP:
            moto's ThreadedMotoServer in a child process on 127.0.0.1 (a server of its own, as S3
            is, never sharing this process's interpreter). One adapter (a PEFT LoRA of the tiny
            base) is published for real with registry.publish; every other is its files copied in
            the layout publish leaves (adapters/<owner>/<name>/v<N>/{.claim, adapter_config.json,
            adapter_model.safetensors, manifest.json}), one in ten with a second version, one in
            twenty with a next version claimed and copied but no manifest yet (a publish in flight).
            resolve: registry.resolve of random explicit references (name, owner/name, name/vN)
            and implicit ones (a tenant's adapter for a modality, else the platform's), each timed
            -> resolve_p50_ms, p99; the same sample through the registry as it was before this
            bench (each adapter's listing paged through its siblings' keys, then an existence check
            before the read) -> resolve_before_p50_ms.
            s3_*: what a resolve is made of, one adapter folder's listing and one manifest's read,
            and that listing in a bucket holding one adapter (moto scans the whole bucket to list
            any prefix, so its listings slow down as the bucket grows; S3 indexes keys by prefix).
            list_owner: list_adapters of the tenant holding --big adapters, now (one listing, then
            only each adapter's newest manifest, 8 reads at a time) and as it was (per adapter:
            its own listing, an existence check, a read, one adapter after another).
  mixed     the hf engine on the demo's embedded base (bench/serve_engine.py): one batch of --mixed
            requests (64), each with its own r-8 adapter, vs the same batch on the bare base ->
            mixed64_vs_base; --mixed-new-tokens per request.
  affinity  the Serve app with 2 ModelServer replicas (--affinity-base: tiny by default, or the
            embedded one), --affinity-adapters tenant adapters (16) uploaded over HTTP, then
            --affinity-requests (200) requests over HTTP, --affinity-clients at a time, their
            adapters drawn from a Zipf law (s --zipf, seeded). Hit rate = requests answered by a
            replica that already held their adapter / adapter requests = 1 - misses / requests, from
            the replicas' counters in /metrics (each request that had to load its adapter is one
            miss; the first request of each adapter is one wherever it lands, so 1 - adapters used /
            requests is the best possible). The store is a file store.
  hot_load  bench/serve.py's http_bench on the embedded base (one replica): a tenant's upload
            accepted -> the first token of a 1-token answer with it, for --uploads adapters (its
            other measurements run too, at their smallest).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from bench.serve import ADMIN_KEY, fresh_adapters, http_bench, pct, start_app
from ddft import client, config
from ddft.adapters import registry
from ddft.adapters.registry import Manifest
from ddft.cluster import free_port
from ddft.store import Store

REPO = Path(__file__).resolve().parents[1]
MODALITIES = ("text", "video", "image")
S3_CREDS = dict(region="us-east-1", access_key_id="bench", secret_access_key="bench")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# -- registry ------------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_endpoint():
    """moto's ThreadedMotoServer in a child process on 127.0.0.1; its endpoint URL."""
    port = free_port()
    code = (
        "import threading\n"
        "from moto.server import ThreadedMotoServer\n"
        f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
        "threading.Event().wait()\n"
    )
    log = tempfile.TemporaryFile()  # its request log; shown if it fails to start
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"moto's server did not start on 127.0.0.1:{port}: {log.read()[-2000:]!r}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def real_adapter(store: Store, tmp: Path) -> Manifest:
    """One LoRA (r 8 on the language model's q/k/v/o) of the tiny base, published with registry.publish."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ddft.models.load import ensure_base, load_base, local_base_dir

    base_store = Store(str(tmp / "base-store"))
    base = ensure_base(base_store, "tiny", build="tiny")
    model, _ = load_base(local_base_dir(base_store, "tiny"))
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=config.LM_TARGETS, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(tmp / "adapter")
    return registry.publish(
        store, tmp / "adapter", owner="tenant-t000", name="text", modality="text", base=base, source="uploaded"
    )


@dataclasses.dataclass(frozen=True)
class Entry:
    owner: str
    name: str
    modality: str
    versions: tuple[int, ...]


def layout_plan(tenants: int, adapters: int, big: int) -> list[Entry]:
    """Who holds what: tenant t000 holds `big` adapters, the others the rest round-robin; every
    other tenant has its own "text" and "video" adapters (the rest fall back to the platform's for
    implicit requests); names are lora<k> (lora1 is a prefix of lora10..lora19: S3 lists by prefix)."""
    owners = [f"tenant-t{i:03d}" for i in range(tenants)]
    plan = [Entry("ddft", m, m, (1,)) for m in MODALITIES]
    held: dict[str, list[str]] = {o: [] for o in owners}
    for o in owners[::2]:
        held[o] += ["text", "video"]
    rest = owners[1:] or owners
    k = 0
    while sum(len(v) for v in held.values()) < adapters:
        owner = owners[0] if len(held[owners[0]]) < big else rest[k % len(rest)]
        held[owner].append(f"lora{k}")
        k += 1
    for i, (owner, name) in enumerate((o, n) for o in owners for n in held[o]):
        modality = name if name in MODALITIES else MODALITIES[i % 3]
        plan.append(Entry(owner, name, modality, (1, 2) if i % 10 == 0 else (1,)))
    return plan


def populate(store: Store, tmp: Path, plan: list[Entry], writers: int = 8) -> tuple[int, int]:
    """Write every planned adapter in publish's layout, copying the real one's files; (objects written, s)."""
    t0 = time.perf_counter()
    real = real_adapter(store, tmp)
    layout = {k[len(real.key) + 1 :]: store.read_bytes(k) for k in store.list(real.key + "/")}
    files = {n: d for n, d in layout.items() if n != "manifest.json"}
    writes: list[tuple[str, bytes | dict]] = []
    for i, e in enumerate(plan):
        prefix = registry.adapter_prefix(e.owner, e.name)
        for v in e.versions:
            if (e.owner, e.name, v) == (real.owner, real.name, real.version):
                continue
            writes += [(f"{prefix}/v{v}/{n}", d) for n, d in files.items()]
            m = dataclasses.replace(real, owner=e.owner, name=e.name, version=v, modality=e.modality)
            writes.append((f"{prefix}/v{v}/manifest.json", dataclasses.asdict(m)))
        if i % 20 == 5:  # the next version claimed and copied; its manifest not written yet
            writes += [(f"{prefix}/v{e.versions[-1] + 1}/{n}", d) for n, d in files.items()]

    def write(kv):
        key, data = kv
        store.write_json(key, data) if isinstance(data, dict) else store.write_bytes(key, data)

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, writes))
    return len(writes) + len(layout), round(time.perf_counter() - t0, 1)


def _read_manifest_before(store: Store, owner: str, name: str, version: int | None = None) -> Manifest | None:
    """registry.read_manifest as it was: the adapter's listing without a final "/" (on S3 it pages
    through name2/..., name-x/... too), then an existence check before the read."""
    prefix = registry.adapter_prefix(owner, name)
    if version is None:
        found = [re.fullmatch(rf"{re.escape(prefix)}/v(\d+)/manifest\.json", k) for k in store.list(prefix)]
        versions = sorted(int(m.group(1)) for m in found if m)
        if not versions:
            return None
        version = versions[-1]
    key = f"{prefix}/v{version}/manifest.json"
    return Manifest(**store.read_json(key)) if store.exists(key) else None


def _list_adapters_before(store: Store, owner: str) -> list[Manifest]:
    """registry.list_adapters as it was: one listing for the adapters' names, then each adapter's
    own read_manifest (its listing, an existence check, a read), one after another."""
    keys = store.list(f"adapters/{owner}")
    pairs = sorted({tuple(k.split("/")[1:3]) for k in keys if k.endswith("/manifest.json")})
    return [m for o, n in pairs if (m := _read_manifest_before(store, o, n))]


def resolve_sample(plan: list[Entry], n: int, seed: int) -> list[tuple[str, str, str | None]]:
    """(modality, tenant, explicit ref or None): half explicit refs to a random tenant adapter of
    the caller's (name, owner/name or name/vN alike), half implicit (a random tenant and modality)."""
    rng = random.Random(seed)
    theirs = [e for e in plan if e.owner != "ddft"]
    tenants = sorted({e.owner for e in theirs})
    out = []
    for i in range(n):
        if i % 2 == 0:
            e = rng.choice(theirs)
            ref = rng.choice([e.name, f"{e.owner}/{e.name}", f"{e.name}/v{rng.choice(e.versions)}"])
            out.append((e.modality, e.owner.removeprefix("tenant-"), ref))
        else:
            out.append((rng.choice(MODALITIES), rng.choice(tenants).removeprefix("tenant-"), None))
    return out


def _timed(calls, fn) -> list[float]:
    times = []
    for args in calls:
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return times


def registry_bench(args) -> dict:
    import boto3

    from ddft.models.info import BaseInfo

    plan = layout_plan(args.tenants, args.adapters, args.big)
    big_owner = "tenant-t000"  # it holds --big adapters
    with moto_endpoint() as endpoint, tempfile.TemporaryDirectory(prefix="ddft-bench-scale-") as tmp:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=S3_CREDS["region"],
            aws_access_key_id=S3_CREDS["access_key_id"],
            aws_secret_access_key=S3_CREDS["secret_access_key"],
        )
        s3.create_bucket(Bucket="ddft-scale")
        s3.create_bucket(Bucket="ddft-small")
        store = Store("s3://ddft-scale/root", endpoint_url=endpoint, **S3_CREDS)
        objects, populate_s = populate(store, Path(tmp), plan)
        tenant_adapters = sum(e.owner != "ddft" for e in plan)
        print(f"registry: {tenant_adapters} tenant adapters, {objects} objects written in {populate_s} s", flush=True)

        store = Store(store.uri, endpoint_url=endpoint, **S3_CREDS)  # a fresh client, as a replica has
        base = registry.read_manifest(store, "tenant-t000", "text")
        base = BaseInfo(base.base_model_id, base.base_fingerprint, "")
        sample = resolve_sample(plan, args.resolves, args.seed)
        calls = [(store, modality, tenant, ref, base) for modality, tenant, ref in sample]
        for c in calls[:20]:  # warm up: connections, imports
            registry.resolve(*c)
        # the same answers both ways
        with mock.patch.object(registry, "read_manifest", _read_manifest_before):
            before = [registry.resolve(*c) for c in calls[:50]]
        assert [registry.resolve(*c) for c in calls[:50]] == before
        now = _timed(calls, registry.resolve)
        with mock.patch.object(registry, "read_manifest", _read_manifest_before):
            then = _timed(calls, registry.resolve)
        explicit = [t for t, (_, _, ref) in zip(now, sample, strict=True) if ref]
        implicit = [t for t, (_, _, ref) in zip(now, sample, strict=True) if not ref]
        # what a resolve is made of: one adapter folder's listing, one manifest's read; and the
        # same listing in a bucket holding one adapter (moto lists by scanning the whole bucket)
        some = random.Random(args.seed).sample(plan, min(100, len(plan)))
        prefixes = [(registry.adapter_prefix(e.owner, e.name) + "/",) for e in some]
        list_one = _timed(prefixes, store.list)
        get_one = _timed(
            [(f"{p}v{e.versions[-1]}/manifest.json",) for (p,), e in zip(prefixes, some)], store.read_bytes
        )
        small = Store("s3://ddft-small/root", endpoint_url=endpoint, **S3_CREDS)
        for key in store.list(prefixes[0][0]):
            small.write_bytes(key, store.read_bytes(key))
        list_small = _timed(prefixes[:1] * len(prefixes), small.list)

        listed = registry.list_adapters(store, big_owner)
        assert len(listed) == args.big and listed == _list_adapters_before(store, big_owner)
        list_now = _timed([(store, big_owner)] * args.list_repeats, registry.list_adapters)
        list_then = _timed([(store, big_owner)] * args.list_before_repeats, _list_adapters_before)
        t = time.perf_counter()
        everything = registry.list_adapters(store)
        list_all_s = time.perf_counter() - t
        assert len(everything) == len(plan)
    result = {
        "registry_tenant_adapters": tenant_adapters,
        "registry_tenants": args.tenants,
        "registry_objects": objects,
        "resolve_p50_ms": _ms(statistics.median(now)),
        "resolve_p99_ms": _ms(pct(now, 0.99)),
        "resolve_explicit_p50_ms": _ms(statistics.median(explicit)),
        "resolve_implicit_p50_ms": _ms(statistics.median(implicit)),
        "resolve_before_p50_ms": _ms(statistics.median(then)),
        "resolve_before_p99_ms": _ms(pct(then, 0.99)),
        "resolves": len(now),
        "s3_list_adapter_p50_ms": _ms(statistics.median(list_one)),
        "s3_get_manifest_p50_ms": _ms(statistics.median(get_one)),
        "s3_list_adapter_in_small_bucket_p50_ms": _ms(statistics.median(list_small)),
        "list_owner_adapters": args.big,
        "list_owner_p50_ms": _ms(statistics.median(list_now)),
        "list_owner_before_p50_ms": _ms(statistics.median(list_then)),
        "list_owner_speedup": round(statistics.median(list_then) / statistics.median(list_now), 1),
        "list_all_ms": _ms(list_all_s),
        "list_all_adapters": len(everything),
    }
    print("registry:", json.dumps(result), flush=True)
    return result


# -- mixed batch ---------------------------------------------------------------------------------


def mixed_bench(args, cfg) -> dict:
    from bench.serve_engine import engine_bench
    from ddft.models.load import ensure_base

    store = Store.from_config(cfg.store)
    ensure_base(store, cfg.base.id, build=cfg.base.build, source=cfg.base.source)
    n = args.mixed
    got = engine_bench(
        store,
        cfg.base.id,
        adapters=n,
        batch=n,
        new_tokens=args.mixed_new_tokens,
        repeats=args.mixed_repeats,
        modes=("base", "mixed"),
    )
    result = {
        f"mixed{n}_vs_base": got["mixed_vs_base"],
        f"mixed{n}_tokens_per_s": got["mixed_tokens_per_s"],
        f"base{n}_tokens_per_s": got["base_tokens_per_s"],
        "mixed_new_tokens": got["new_tokens"],
        "mixed_repeats": got["repeats"],
    }
    print(f"mixed {n}:", json.dumps(got), flush=True)
    return result


# -- affinity ------------------------------------------------------------------------------------


def _counters(url: str) -> dict[str, float]:
    import requests

    text = requests.get(f"{url}/metrics", timeout=60).text
    names = ("loads", "hits", "misses", "evictions")
    return {
        n: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"ddft_adapter_{n}_total "))
        for n in names
    }


def zipf_order(adapters: int, requests: int, s: float, seed: int) -> list[int]:
    weights = [1 / (k + 1) ** s for k in range(adapters)]
    return random.Random(seed).choices(range(adapters), weights, k=requests)


def affinity_bench(args, cfg) -> dict:
    import requests
    from ray import serve

    from ddft.cluster import ray_session
    from ddft.models.load import ensure_base

    with tempfile.TemporaryDirectory(prefix="ddft-bench-affinity-") as tmp:
        doc = cfg.model_dump(mode="json")
        if args.affinity_base == "tiny":
            store, base = Store(str(Path(tmp) / "store")), {"id": "tiny", "build": "tiny", "source": None}
        else:
            store, base = Store.from_config(cfg.store), doc["base"]
        ensure_base(store, base["id"], build=base["build"], source=base["source"])
        doc["store"]["uri"], doc["base"] = store.uri, base
        doc["serve"].update(
            port=free_port(),
            num_replicas=2,
            cpus_per_replica=0.5,
            adapter_cache_size=args.affinity_adapters,
            engine="hf",
        )
        cfg_path = Path(tmp) / "affinity.yaml"
        cfg_path.write_text(json.dumps(doc))
        folders = fresh_adapters(store, base["id"], Path(tmp), args.affinity_adapters)
        order = zipf_order(args.affinity_adapters, args.affinity_requests, args.zipf, args.seed)
        with ray_session(num_cpus=4):
            url = start_app(cfg_path)
            try:
                key = client.add_tenant(url, f"zipf{int(time.time())}", admin_key=ADMIN_KEY)
                for i, folder in enumerate(folders):
                    client.upload_adapter(url, f"z{i}", folder, "text", api_key=key)
                client.generate(url, "text", "Warm up?", max_new_tokens=1)  # the base, on some replica
                before = _counters(url)

                def one(i: int) -> float:
                    body = {"modality": "text", "question": "Boil an egg?", "adapter": f"z{i}", "max_new_tokens": 2}
                    t = time.perf_counter()
                    answer = requests.post(
                        f"{url}/v1/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300
                    )
                    answer.raise_for_status()
                    assert answer.json()["adapter"].split("/")[1] == f"z{i}", answer.text
                    return time.perf_counter() - t

                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.affinity_clients) as pool:
                    latencies = list(pool.map(one, order))
                traffic_s = time.perf_counter() - t0
                after = _counters(url)
            finally:
                serve.shutdown()
    d = {k: round(after[k] - before[k]) for k in after}
    # A request whose replica lacks its adapter counts one miss (Serve's multiplexed loader loads
    # it), then, like every request, a hit when its batch takes the adapter: so hits count
    # acquisitions (requests + misses), and the requests that found their adapter are the others.
    result = {
        "affinity_hit_rate": round(1 - d["misses"] / len(order), 3),
        "affinity_loads": d["loads"],
        "affinity_misses": d["misses"],
        "affinity_hits_counted": d["hits"],
        "affinity_evictions": d["evictions"],
        "affinity_adapters_used": len(set(order)),
        "affinity_best_possible": round(1 - len(set(order)) / len(order), 3),
        "affinity_requests": len(order),
        "affinity_clients": args.affinity_clients,
        "affinity_base": base["id"],
        "affinity_p50_ms": _ms(statistics.median(latencies)),
        "affinity_requests_per_s": round(len(order) / traffic_s, 1),
    }
    print("affinity:", json.dumps(result), flush=True)
    return result


# -- hot load ------------------------------------------------------------------------------------


def hot_load_bench(args, cfg) -> dict:
    from ddft.models.load import ensure_base

    store = Store.from_config(cfg.store)
    ensure_base(store, cfg.base.id, build=cfg.base.build, source=cfg.base.source)
    with tempfile.TemporaryDirectory(prefix="ddft-bench-cfg-") as tmp:
        doc = cfg.model_dump(mode="json")
        doc["store"]["uri"] = store.uri
        doc["serve"].update(port=free_port(), num_replicas=1, engine="hf")
        cfg_path = Path(tmp) / "hot.yaml"
        cfg_path.write_text(json.dumps(doc))
        got = http_bench(cfg_path, store, cfg.base.id, args.uploads, recipes=1, clients=1, new_tokens=4)
    print("hot load:", json.dumps(got), flush=True)
    return {
        "hot_load_p50_ms": got["hot_load_p50_ms"],
        "hot_load_max_ms": got["hot_load_max_ms"],
        "uploads": args.uploads,
    }


PARTS = ("registry", "mixed", "affinity", "hot_load")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "jobs/configs/demo.yaml"))
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which to run, of {','.join(PARTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapters", type=int, default=5000, help="tenant adapters in the registry's store")
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--big", type=int, default=1000, help="adapters of the first tenant (list_owner's)")
    ap.add_argument("--resolves", type=int, default=400)
    ap.add_argument("--list-repeats", type=int, default=5)
    ap.add_argument("--list-before-repeats", type=int, default=1, help="the old listing: ~85 s each here")
    ap.add_argument("--mixed", type=int, default=64, help="requests in the mixed batch, each its own adapter")
    ap.add_argument("--mixed-new-tokens", type=int, default=64)
    ap.add_argument("--mixed-repeats", type=int, default=2)
    ap.add_argument("--affinity-base", choices=("tiny", "embedded"), default="tiny")
    ap.add_argument("--affinity-adapters", type=int, default=16)
    ap.add_argument("--affinity-requests", type=int, default=200)
    ap.add_argument("--affinity-clients", type=int, default=1)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--uploads", type=int, default=7)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"--parts: {sorted(set(parts) - set(PARTS))} unknown; of {PARTS}")
    if args.big > args.adapters:
        ap.error("--big is more than --adapters")
    cfg = config.load(Path(args.config))
    result: dict = {"bench": "scale"}
    t0 = time.perf_counter()
    for part, run in (
        ("registry", registry_bench),
        ("mixed", mixed_bench),
        ("affinity", affinity_bench),
        ("hot_load", hot_load_bench),
    ):
        if part in parts:
            t = time.perf_counter()
            result.update(run(args) if part == "registry" else run(args, cfg))
            result[f"{part}_s"] = round(time.perf_counter() - t, 1)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
