"""The serve app over real HTTP: a local Ray cluster, a file store with the tiny base and three
published adapters (image, video, text), the app deployed with serve.run."""
from __future__ import annotations

import base64
import io
import socket
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from ddft import client
from ddft.config import ConfigError
from ddft.models.load import ensure_base
from ddft.store import Store
from tests.test_engine_hf import make_adapter

ROOT_CONFIG = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path, store_uri: str, port: int) -> str:
    cfg = {"store": {"uri": store_uri}, "base": {"id": "tiny"},
           "jobs": [{"name": "video", "modality": "video"}],
           "serve": {"host": "127.0.0.1", "port": port, "max_new_tokens": 6, "adapter_cache_size": 4,
                     "cpus_per_replica": 1}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_build_app_validates_before_serve(tmp_path):
    from serve.app import build_app

    with pytest.raises(ConfigError, match="config: required"):
        build_app({})
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {id: tiny}\njobs: []\nserve: {port: 0}\n")
    with pytest.raises(ConfigError) as err:
        build_app({"config": str(bad)})
    assert "jobs" in str(err.value) and "serve.port" in str(err.value)


def test_serve_config_file_is_valid():
    from ray.serve.schema import ServeDeploySchema

    text = ROOT_CONFIG.read_text()
    assert text.startswith("# serve run serve/config.yaml")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app" and app.args == {"config": "jobs/configs/demo.yaml"}


def test_upload_size_limit():
    from starlette.requests import Request

    from serve.app import MAX_UPLOAD_BYTES, ApiError, Gateway

    gateway = Gateway.func_or_class
    huge = Request({"type": "http", "headers": [(b"content-length", str(2 * MAX_UPLOAD_BYTES).encode())]})
    with pytest.raises(ApiError) as err:
        gateway._check_length(huge)
    assert (err.value.status, err.value.error) == (413, "too_large") and "200 MB" in err.value.detail
    gateway._check_length(Request({"type": "http", "headers": [(b"content-length", b"1000")]}))


@pytest.fixture(scope="module")
def app_url(ray_cluster, tmp_path_factory):
    from ray import serve

    from serve.app import run

    tmp = tmp_path_factory.mktemp("serve")
    store = Store(str(tmp / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    for seed, modality in enumerate(("image", "video", "text")):
        make_adapter(store, base, modality, seed, tmp)
    make_adapter(store, base, "text", 5, tmp, owner="tenant-acme")
    store.write_bytes("datasets/raw/clips/one.mp4", make_mp4())
    url = run(write_config(tmp, store.uri, _free_port()))
    try:
        yield url, store
    finally:
        serve.shutdown()


@pytest.mark.integration
def test_recipe_from_upload_and_uri(app_url):
    url, store = app_url
    out = client.post_recipe(url, make_mp4())
    assert out["adapter"] == "ddft/video/v1" and out["base"] == "tiny"
    assert isinstance(out["ingredients"], list) and isinstance(out["steps"], list) and isinstance(out["text"], str)
    assert set(out["timings"]) >= {"decode_s", "generate_s", "total_s"}
    by_uri = client.post_recipe(url, video_uri=store.url("datasets/raw/clips/one.mp4"))
    assert by_uri["adapter"] == "ddft/video/v1"
    assert client.post_recipe(url, video_uri="datasets/raw/clips/one.mp4")["text"] == by_uri["text"]


@pytest.mark.integration
def test_generate_routes_to_the_modality_adapter(app_url):
    url, _ = app_url
    image = client.generate(url, "image", image_bytes=make_png())
    assert image["adapter"] == "ddft/image/v1" and isinstance(image["answer"], str)
    text = client.generate(url, "text", "How long do I boil an egg?")
    assert text["adapter"] == "ddft/text/v1" and text["base"] == "tiny"


@pytest.mark.integration
def test_concurrent_requests_mix_adapters(app_url):
    """Tenants' and the platform's text adapters answer concurrently, each as it does alone."""
    from concurrent.futures import ThreadPoolExecutor

    url, _ = app_url
    calls = [(tenant, q) for q in ("Boil an egg?", "How much salt in pasta water?") for tenant in (None, "acme")]
    alone = [client.generate(url, "text", q, tenant=t) for t, q in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(lambda c: client.generate(url, "text", c[1], tenant=c[0]), calls))
    assert [r["adapter"] for r in together] == ["ddft/text/v1", "tenant-acme/text/v1"] * 2
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    explicit = client.generate(url, "text", "Boil an egg?", tenant="acme", adapter="tiny:ddft/text/v1")
    assert explicit["adapter"] == "ddft/text/v1" and explicit["answer"] == alone[0]["answer"]
    print("batch sizes:", [r["timings"]["batch_size"] for r in together])


@pytest.mark.integration
def test_errors_are_json_and_the_server_survives(app_url):
    url, _ = app_url
    garbage = requests.post(f"{url}/v1/recipes", files={"video": ("x.mp4", b"\x00not a video" * 100)}, timeout=60)
    assert garbage.status_code == 422, garbage.text
    assert garbage.json()["error"] == "undecodable_video" and garbage.json()["detail"]
    checks = [
        (requests.post(f"{url}/v1/generate", json={"modality": "image", "image_b64": base64.b64encode(b"nope").decode()},
                       timeout=60), 422, "unreadable_image"),
        (requests.post(f"{url}/v1/recipes", json={"video_uri": "datasets/raw/clips/missing.mp4"}, timeout=60),
         404, "not_found"),
        (requests.post(f"{url}/v1/recipes", json={"video_uri": "file:///etc/passwd"}, timeout=60),
         400, "uri_outside_store"),
        (requests.post(f"{url}/v1/generate", json={"modality": "text", "question": "Hi?", "adapter": "nope"},
                       timeout=60), 404, "unknown_adapter"),
        (requests.post(f"{url}/v1/generate", data=b"{not json", headers={"Content-Type": "application/json"},
                       timeout=60), 400, "bad_json"),
        (requests.get(f"{url}/v1/nothing", timeout=60), 404, "not_found"),
        (requests.post(f"{url}/v1/generate", json={"modality": "text", "question": "Hi?", "adapter": "ddft/video/v1"},
                       timeout=60), 400, "adapter_modality"),
        (requests.post(f"{url}/v1/generate", json={"modality": "text", "question": "Hi?",
                                                   "adapter": "tenant-acme/text/v1"}, timeout=60),
         404, "unknown_adapter"),  # another tenant's adapter is not yours
        (requests.get(f"{url}/v1/models", headers={"X-Tenant": "Bad Tenant!"}, timeout=60), 400, "bad_tenant"),
    ]
    for resp, status, error in checks:
        assert (resp.status_code, resp.json()["error"]) == (status, error), resp.text
        assert resp.json()["detail"]
    with pytest.raises(client.ClientError, match="bad_modality"):
        client.generate(url, "video", "recipe?")
    assert client.health(url)["status"] == "ok"
    assert client.generate(url, "text", "Still there?")["adapter"] == "ddft/text/v1"


@pytest.mark.integration
def test_models_lists_base_and_adapters(app_url):
    url, _ = app_url
    platform = ["tiny", "tiny:ddft/image/v1", "tiny:ddft/text/v1", "tiny:ddft/video/v1"]
    assert client.models(url) == platform
    assert client.models(url, tenant="acme") == platform + ["tiny:tenant-acme/text/v1"]
