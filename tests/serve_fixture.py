"""Starting the serve app for HTTP tests: a file store with the tiny base, three platform adapters
(image, video, text) and tenant acme's text adapter, deployed with serve.run on a free port, the
admin key set; tenants acme and beta created through the admin API. One app per test module."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ddft import client
from ddft.cluster import free_port
from ddft.models.load import ensure_base
from ddft.store import Store

ADMIN_KEY = "admin-key-for-tests-only"


def make_mp4(frames: int = 16, size: int = 224) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((size, size, 3), dtype=np.uint8)
            img[:, : (i + 1) * size // frames] = (200, 80 + 8 * i, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_config(tmp_path: Path, store_uri: str, port: int, **serve) -> str:
    cfg = {
        "store": {"uri": store_uri},
        "base": {"id": "tiny"},
        "jobs": [{"name": "video", "modality": "video"}],
        "serve": {
            "host": "127.0.0.1",
            "port": port,
            "max_new_tokens": 6,
            "adapter_cache_size": 4,
            "cpus_per_replica": 1,
            "max_adapter_mb": 2,
            "max_media_mb": 1,
            **serve,
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def seed_store(tmp: Path) -> Store:
    from tests.test_engine_hf import make_adapter

    store = Store(str(tmp / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    for seed, modality in enumerate(("image", "video", "text")):
        make_adapter(store, base, modality, seed, tmp)
    make_adapter(store, base, "text", 5, tmp, owner="tenant-acme")
    store.write_bytes("datasets/raw/clips/one.mp4", make_mp4())
    return store


@dataclass
class App:
    url: str
    store: Store
    keys: dict[str, str]  # tenant -> key
    tmp: Path
    config: str  # the pipeline YAML it runs


@contextlib.contextmanager
def running_app(tmp: Path, **serve_settings):
    """The app on 127.0.0.1 (needs a Ray cluster: the ray_cluster fixture); shut down after."""
    from ray import serve

    from serve.app import run

    store = seed_store(tmp)
    config = write_config(tmp, store.uri, free_port(), **serve_settings)
    os.environ["DDFT_ADMIN_KEY"] = ADMIN_KEY  # build_app reads it here, in the driver
    try:  # Serve is shut down even when the start fails: one left up would keep its port for later tests
        try:
            url = run(config)
        finally:
            del os.environ["DDFT_ADMIN_KEY"]
        keys = {t: client.add_tenant(url, t, admin_key=ADMIN_KEY) for t in ("acme", "beta")}
        yield App(url, store, keys, tmp, config)
    finally:
        serve.shutdown()


def engine_figures_under_load(app: App, clients: int = 8) -> tuple[float, dict]:
    """Scrape /metrics (prometheus_client's parser) while `clients` streamed chats run at once: the
    most running rows any scrape saw, and every sample of the scrape after they all finished
    ({(name, frozenset(labels)): value})."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = requests.get(f"{app.url}/metrics", timeout=30).text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def chat(i: int) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"Boil egg {i}?"}], "stream": True}
        with requests.post(
            f"{app.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {app.keys['acme']}"},
            stream=True,
            timeout=120,
        ) as r:
            assert r.status_code == 200, r.text
            for _ in r.iter_lines():
                pass

    done, most = threading.Event(), 0.0
    with ThreadPoolExecutor(clients + 1) as pool:

        def watch():
            nonlocal most
            while not done.is_set():
                running = [v for (n, _), v in scrape().items() if n == "ddft_engine_running_rows"]
                most = max([most, *running])

        watcher = pool.submit(watch)
        list(pool.map(chat, range(clients)))
        done.set()
        watcher.result()
    return most, scrape()
