"""The serve app over real HTTP: a local Ray cluster, a file store with the tiny base, three
platform adapters and one tenant's, the app deployed with serve.run; tenants made by the admin."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from ddft import client
from ddft.config import ConfigError
from ddft.models.load import ensure_base
from ddft.store import Store
from serve.prometheus import adapter_label
from tests.serve_fixture import ADMIN_KEY, make_mp4, make_png, running_app, write_config
from tests.test_engine_hf import lora_folder

ROOT_CONFIG = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"


def adapter_folder(store, out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA folder on the tiny base's language model, as a tenant would upload it."""
    return lora_folder(store, out, seed, r=rank, lora_alpha=2 * rank)


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_build_app_validates_before_serve(tmp_path):
    from serve.app import build_app

    with pytest.raises(ConfigError, match="config: required"):
        build_app({})
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {id: tiny}\njobs: []\nserve: {port: 0, engine: tgi}\n")
    with pytest.raises(ConfigError) as err:
        build_app({"config": str(bad)})
    assert "jobs" in str(err.value) and "serve.port" in str(err.value) and "serve.engine" in str(err.value)


def test_serve_config_file_is_valid(tmp_path):
    """serve/config.yaml: Serve's own schema, and its deployment overrides name real deployments."""
    from ray.serve.schema import ServeDeploySchema

    text = ROOT_CONFIG.read_text()
    assert text.startswith("# serve run serve/config.yaml")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app" and app.args == {"config": "jobs/configs/demo.yaml"}
    model = {d.name: d for d in app.deployments}["ModelServer"]
    assert model.autoscaling_config["max_replicas"] > model.autoscaling_config["min_replicas"] >= 1
    store = Store(str(tmp_path / "store"))
    ensure_base(store, "tiny", build="tiny")
    from ddft import config as ddft_config
    from serve.app import build_app, model_deployment
    from serve.gateway import Gateway

    path = write_config(tmp_path, store.uri, 8000)
    assert build_app({"config": path}) is not None  # dry run: validated and bound, nothing deployed
    names = {Gateway.name, model_deployment(ddft_config.load(Path(path))).name}
    assert {d.name for d in app.deployments} <= names


@pytest.fixture(scope="module")
def app_url(ray_cluster, tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("serve")) as app:
        yield app.url, app.store, app.keys, app.tmp


@pytest.mark.integration
def test_recipe_from_upload_and_uri(app_url):
    url, store, _, _ = app_url
    out = client.post_recipe(url, make_mp4())
    assert out["adapter"] == "ddft/video/v1" and out["base"] == "tiny"
    assert isinstance(out["ingredients"], list) and isinstance(out["steps"], list) and isinstance(out["text"], str)
    assert set(out["timings"]) >= {"decode_s", "generate_s", "total_s"}
    by_uri = client.post_recipe(url, video_uri=store.url("datasets/raw/clips/one.mp4"))
    assert by_uri["adapter"] == "ddft/video/v1"
    assert client.post_recipe(url, video_uri="datasets/raw/clips/one.mp4")["text"] == by_uri["text"]


@pytest.mark.integration
def test_a_video_is_sampled_as_its_adapter_was_trained(app_url):
    """Serving reads the frame count from the adapter's manifest: the platform's video adapter (8
    frames) and the same weights published as trained on 4 see the clip with 8 and 4 frames (its
    prompt holds one frame's tokens per frame), so the two prompts differ by 4 frames' tokens."""
    from transformers import AutoProcessor

    from ddft import prompts
    from ddft.adapters import registry
    from ddft.models.info import base_spec
    from ddft.models.load import local_base_dir

    url, store, keys, _ = app_url
    ours = registry.read_manifest(store, "ddft", "video")
    spec = base_spec(store, "tiny")
    four = registry.publish(
        store,
        registry.fetch(store, ours),
        owner="tenant-acme",
        name="video-4-frames",
        modality="video",
        base=registry.BaseInfo("tiny", spec.fingerprint, ""),
        source="uploaded",
        frames=4,
        frame_strategy="keyframe",
    )
    try:

        def recipe(**adapter) -> dict:
            body = {"video_uri": "datasets/raw/clips/one.mp4", "max_new_tokens": 2, **adapter}
            auth = {"Authorization": f"Bearer {keys['acme']}"}
            return requests.post(f"{url}/v1/recipes", json=body, headers=auth, timeout=120).json()

        eight, fewer = recipe(), recipe(adapter="video-4-frames")
        assert (eight["adapter"], fewer["adapter"]) == ("ddft/video/v1", four.ref)
        processor = AutoProcessor.from_pretrained(local_base_dir(store, "tiny"))
        per_frame = prompts.media_token_count(processor, "video", 1)
        assert eight["timings"]["prompt_tokens"] - fewer["timings"]["prompt_tokens"] == 4 * per_frame
    finally:
        registry.delete(store, "tenant-acme", "video-4-frames")


@pytest.mark.integration
def test_routing_per_modality_and_tenant(app_url):
    url, _, keys, _ = app_url
    image = client.generate(url, "image", image_bytes=make_png())
    assert image["adapter"] == "ddft/image/v1" and isinstance(image["answer"], str)
    assert client.generate(url, "text", "How long do I boil an egg?")["adapter"] == "ddft/text/v1"
    # acme has its own text adapter; beta has none and falls back to the platform's
    assert client.generate(url, "text", "Boil an egg?", api_key=keys["acme"])["adapter"] == "tenant-acme/text/v1"
    assert client.generate(url, "text", "Boil an egg?", api_key=keys["beta"])["adapter"] == "ddft/text/v1"
    assert client.generate(url, "image", image_bytes=make_png(), api_key=keys["acme"])["adapter"] == "ddft/image/v1"
    explicit = client.generate(url, "text", "Boil an egg?", api_key=keys["acme"], adapter="tiny:ddft/text/v1")
    assert explicit["adapter"] == "ddft/text/v1" and explicit["base"] == "tiny"


@pytest.mark.integration
def test_concurrent_requests_mix_adapters(app_url):
    """Tenants' and the platform's text adapters answer concurrently, each as it does alone."""
    url, _, keys, _ = app_url
    calls = [(key, q) for q in ("Boil an egg?", "How much salt in pasta water?") for key in (None, keys["acme"])]
    alone = [client.generate(url, "text", q, api_key=k) for k, q in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(lambda c: client.generate(url, "text", c[1], api_key=c[0]), calls))
    assert [r["adapter"] for r in together] == ["ddft/text/v1", "tenant-acme/text/v1"] * 2
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    assert max(r["timings"]["batch_size"] for r in together) > 1  # they did share a batch


@pytest.mark.integration
def test_openai_chat_completions(app_url):
    url, _, keys, _ = app_url
    text = client.chat(
        url,
        "tiny",
        [{"role": "system", "content": "You cook."}, {"role": "user", "content": "How long do I boil an egg?"}],
        max_tokens=4,
    )
    assert text["object"] == "chat.completion" and text["adapter"] == "ddft/text/v1"
    assert text["model"] == "tiny:ddft/text/v1" and text["choices"][0]["message"]["role"] == "assistant"
    assert text["usage"]["completion_tokens"] <= 4 and text["choices"][0]["finish_reason"] in ("stop", "length")
    png = base64.b64encode(make_png()).decode()
    image = client.chat(
        url,
        "tiny:ddft/image/v1",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What dish is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            }
        ],
    )
    assert image["adapter"] == "ddft/image/v1"
    mine = client.chat(url, "tiny", [{"role": "user", "content": "Boil an egg?"}], api_key=keys["acme"])
    assert mine["adapter"] == "tenant-acme/text/v1"
    for model, status, error in (
        ("gpt-4", 404, "model_not_found"),
        ("tiny:tenant-acme/text/v1", 404, "unknown_adapter"),
        ("tiny:nope", 404, "unknown_adapter"),
    ):
        resp = requests.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}]},
            timeout=60,
        )  # anonymous: acme's adapter is not visible
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, error), resp.text  # OpenAI's shape
        assert resp.json()["error"]["message"], resp.text


def recipe_videos() -> list[bytes]:
    """A fixed set of cooking videos: the clips differ in length and size."""
    return [make_mp4(frames, size) for frames, size in ((16, 224), (8, 224), (20, 160), (12, 128))]


def check_recipes(url: str, store) -> None:
    """Every recipe answer over the fixed set (uploaded, by URI, streamed) validates against the
    schema docs/openapi.json publishes, and its text is what the recipe grammar let the model write."""
    from tests.test_grammar import published
    from tests.test_streaming import _events

    validator = published("RecipeAnswer")
    answers = [client.post_recipe(url, video) for video in recipe_videos()]
    answers.append(client.post_recipe(url, video_uri="datasets/raw/clips/one.mp4"))
    events = _events(
        requests.post(f"{url}/v1/recipes?stream=true", files={"video": recipe_videos()[1]}, stream=True, timeout=120)
    )
    answers += [json.loads(data) for name, data in events if name == "recipe"]
    assert len(answers) == 6
    for out in answers:
        validator.validate(out)
        whole = "Ingredients:\n- "
        assert whole.startswith(out["text"]) or out["text"].startswith(whole), out["text"]  # the grammar's start


@pytest.mark.integration
def test_every_recipe_validates_against_the_published_schema(app_url):
    url, store, _, _ = app_url
    check_recipes(url, store)


def check_response_format(client_) -> None:
    """OpenAI's response_format through the official client: json_schema (plain and streamed) and
    json_object decode under it; a malformed one is a 400, a schema the decoder can't use a 422,
    both with code bad_response_format."""
    import jsonschema
    import openai

    schema = {"enum": ["yes", "no"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Is the egg done? JSON please."}], "max_tokens": 6}
    plain = client_.chat.completions.create(**ask, response_format=fmt)
    assert plain.choices[0].finish_reason == "stop", plain
    jsonschema.validate(json.loads(plain.choices[0].message.content), schema)
    streamed = client_.chat.completions.create(**ask, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.choices[0].message.content
    obj = client_.chat.completions.create(**ask, response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{"), obj
    text = client_.chat.completions.create(**ask, response_format={"type": "text"})
    assert text.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:  # the request's shape: no json_schema
        client_.chat.completions.create(**ask, response_format={"type": "json_schema"})
    assert err.value.code == "bad_response_format" and "json_schema" in err.value.message
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    with pytest.raises(openai.UnprocessableEntityError) as err:  # well-formed, but no decoder takes it
        client_.chat.completions.create(**ask, response_format=bad)
    assert err.value.code == "bad_response_format" and 'Unsupported type "strin"' in err.value.message


@pytest.mark.integration
def test_openai_response_format(app_url):
    import openai

    url, _, keys, _ = app_url
    check_response_format(openai.OpenAI(base_url=f"{url}/v1", api_key=keys["acme"], max_retries=0, timeout=120))


@pytest.mark.integration
def test_models_lists_what_each_caller_may_use(app_url):
    url, _, keys, _ = app_url
    platform = ["tiny", "tiny:ddft/image/v1", "tiny:ddft/text/v1", "tiny:ddft/video/v1"]
    assert client.models(url) == platform
    assert client.models(url, api_key=keys["acme"]) == platform + ["tiny:tenant-acme/text/v1"]
    assert client.models(url, api_key=keys["beta"]) == platform


@pytest.mark.integration
def test_tenant_upload_is_served_and_private(app_url):
    url, store, keys, tmp = app_url
    folder = adapter_folder(store, tmp / "acme-soup", seed=11)
    up = client.upload_adapter(url, "soup", folder, "text", api_key=keys["acme"])
    assert up["adapter"] == "tenant-acme/soup/v1" and up["model"] == "tiny:tenant-acme/soup/v1"
    answer = client.generate(url, "text", "Boil an egg?", api_key=keys["acme"], adapter="soup")
    assert answer["adapter"] == "tenant-acme/soup/v1"
    chat = client.chat(
        url, "tiny:tenant-acme/soup/v1", [{"role": "user", "content": "Boil an egg?"}], api_key=keys["acme"]
    )
    assert chat["adapter"] == "tenant-acme/soup/v1"
    assert sorted(a["adapter"] for a in client.adapters(url, api_key=keys["acme"])) == [
        "tenant-acme/soup/v1",
        "tenant-acme/text/v1",
    ]
    assert "tiny:tenant-acme/soup/v1" in client.models(url, api_key=keys["acme"])
    # beta: 404 for acme's adapter in every endpoint, never a hint that it exists
    beta = auth(keys["beta"])
    for resp in (
        requests.get(f"{url}/v1/adapters/soup", headers=beta, timeout=60),
        requests.delete(f"{url}/v1/adapters/soup", headers=beta, timeout=60),
        requests.post(
            f"{url}/v1/generate",
            json={"modality": "text", "question": "Hi", "adapter": "soup"},
            headers=beta,
            timeout=60,
        ),
        requests.post(
            f"{url}/v1/generate",
            json={"modality": "text", "question": "Hi", "adapter": "tenant-acme/soup/v1"},
            headers=beta,
            timeout=60,
        ),
        requests.post(
            f"{url}/v1/chat/completions",
            json={"model": "tiny:tenant-acme/soup/v1", "messages": [{"role": "user", "content": "Hi"}]},
            headers=beta,
            timeout=60,
        ),
    ):
        assert resp.status_code == 404, resp.text
    assert "tiny:tenant-acme/soup/v1" not in client.models(url, api_key=keys["beta"])
    assert client.adapters(url, api_key=keys["beta"]) == []
    # a second upload is v2 and answers next; the owner deletes both
    client.upload_adapter(url, "soup", adapter_folder(store, tmp / "acme-soup2", seed=12), "text", api_key=keys["acme"])
    assert client.generate(url, "text", "Hi", api_key=keys["acme"], adapter="soup")["adapter"] == "tenant-acme/soup/v2"
    assert sorted(client.delete_adapter(url, "soup", api_key=keys["acme"])) == [
        "tenant-acme/soup/v1",
        "tenant-acme/soup/v2",
    ]
    gone = requests.post(
        f"{url}/v1/generate",
        json={"modality": "text", "question": "Hi", "adapter": "soup"},
        headers=auth(keys["acme"]),
        timeout=60,
    )
    assert (gone.status_code, gone.json()["error"]) == (404, "unknown_adapter")
    assert not [k for k in store.list("adapters/tenant-acme") if "/soup/" in k]


def _bad_uploads(store, tmp: Path) -> list[tuple[str, dict, int, str]]:
    """(case, requests kwargs, status, error) for every way an upload must be refused."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    good = adapter_folder(store, tmp / "good", seed=21)
    cfg_bytes = (good / "adapter_config.json").read_bytes()
    weights = (good / "adapter_model.safetensors").read_bytes()
    tensors = load_file(good / "adapter_model.safetensors")

    def files(config=cfg_bytes, model=weights, model_name="adapter_model.safetensors"):
        return {
            "files": [("files", ("adapter_config.json", config)), ("files", (model_name, model))],
            "data": {"modality": "text"},
        }

    def st(t: dict) -> bytes:
        path = tmp / "t.safetensors"
        save_file(t, str(path))
        return path.read_bytes()

    def config(**changes) -> bytes:
        return json.dumps({**json.loads(cfg_bytes), **changes}).encode()

    first = sorted(k for k in tensors if "lora_A" in k)[0]
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return [
        ("pickle", files(model=buf.getvalue(), model_name="adapter_model.bin"), 415, "pickle_refused"),
        ("wrong shapes", files(model=st({**tensors, first: torch.zeros(8, 7)})), 422, "wrong_shape"),
        ("wrong base", files(config=config(base_model_name_or_path="someone/other-model")), 422, "wrong_base"),
        ("rank too high", files(config=config(r=128)), 422, "rank_too_high"),
        (
            "unknown module",
            files(model=st({k.replace("q_proj", "zz_proj"): v for k, v in tensors.items()})),
            422,
            "unknown_module",
        ),
        ("truncated", files(model=weights[: len(weights) // 2]), 422, "bad_safetensors"),
        (
            "missing file",
            {"files": [("files", ("adapter_config.json", cfg_bytes))], "data": {"modality": "text"}},
            422,
            "missing_file",
        ),
        ("oversized", files(model=weights + b"\0" * (3 * 2**20)), 413, "too_large"),
        ("no modality", {"files": files()["files"]}, 400, "bad_modality"),
    ]


@pytest.mark.integration
def test_bad_uploads_and_keys_are_refused_and_leave_nothing(app_url):
    url, store, keys, tmp = app_url
    acme = auth(keys["acme"])
    before = sorted(store.list("adapters"))
    for case, kwargs, status, error in _bad_uploads(store, tmp):
        resp = requests.put(f"{url}/v1/adapters/bad", headers=acme, timeout=120, **kwargs)
        assert (resp.status_code, resp.json()["error"]) == (status, error), (case, resp.text)
        assert resp.json()["detail"], case
    good = adapter_folder(store, tmp / "good2", seed=22)
    upload = {
        "files": [
            ("files", (f, (good / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")
        ],
        "data": {"modality": "text"},
    }
    for path, headers, status, error in (
        ("..%2F..%2Fescape", acme, 400, "bad_name"),
        ("a/b", acme, 400, "bad_name"),
        ("Bad Name", acme, 400, "bad_name"),
        ("fine", {}, 401, "missing_key"),
        ("fine", auth("ddft-not-a-real-key"), 401, "bad_key"),
        ("fine", auth(ADMIN_KEY), 403, "admin_not_tenant"),
    ):
        resp = requests.put(f"{url}/v1/adapters/{path}", headers=headers, timeout=60, **upload)
        assert (resp.status_code, resp.json()["error"]) == (status, error), (path, resp.text)
    tenant_admin = requests.post(f"{url}/v1/tenants", json={"name": "evil"}, headers=acme, timeout=60)
    assert (tenant_admin.status_code, tenant_admin.json()["error"]) == (403, "not_admin")
    dup = requests.post(f"{url}/v1/tenants", json={"name": "acme"}, headers=auth(ADMIN_KEY), timeout=60)
    assert dup.status_code == 409, dup.text
    assert sorted(store.list("adapters")) == before  # nothing was left behind, not even staging
    assert client.health(url)["status"] == "ok"
    assert client.generate(url, "text", "Still there?", api_key=keys["acme"])["adapter"] == "tenant-acme/text/v1"


@pytest.mark.integration
def test_bad_media_and_requests_are_json_errors_and_the_server_survives(app_url):
    url, store, _, _ = app_url
    zero_frames = make_mp4(frames=0)
    checks = [
        (
            requests.post(f"{url}/v1/recipes", files={"video": ("x.mp4", make_mp4()[:3000])}, timeout=60),
            422,
            None,
        ),  # a truncated (corrupt) video
        (
            requests.post(f"{url}/v1/recipes", files={"video": ("x.mp4", b"\x00not a video" * 100)}, timeout=60),
            422,
            "undecodable_video",
        ),
        (requests.post(f"{url}/v1/recipes", files={"video": ("x.mp4", zero_frames)}, timeout=60), 422, None),
        (
            requests.post(f"{url}/v1/recipes", files={"video": ("x.mp4", b"\0" * (2 * 2**20))}, timeout=60),
            413,
            "too_large",
        ),
        (
            requests.post(f"{url}/v1/recipes", data=b"raw", headers={"Content-Type": "video/mp4"}, timeout=60),
            415,
            "unsupported_media_type",
        ),
        (
            requests.post(
                f"{url}/v1/generate",
                json={"modality": "image", "image_b64": base64.b64encode(b"nope").decode()},
                timeout=60,
            ),
            422,
            "unreadable_image",
        ),
        (
            requests.post(f"{url}/v1/recipes", json={"video_uri": "datasets/raw/clips/missing.mp4"}, timeout=60),
            404,
            "not_found",
        ),
        (
            requests.post(f"{url}/v1/recipes", json={"video_uri": "file:///etc/passwd"}, timeout=60),
            404,
            "not_found",
        ),  # outside the store: as missing as a forbidden key
        (
            requests.post(f"{url}/v1/recipes", json={"video_uri": "datasets/raw/clips/one.mp4\0"}, timeout=60),
            400,
            "bad_uri",
        ),  # a NUL byte used to be a 500
        (
            requests.post(
                f"{url}/v1/generate", json={"modality": "image", "image_uri": "datasets/\x00a.png"}, timeout=60
            ),
            400,
            "bad_uri",
        ),
        (
            requests.post(
                f"{url}/v1/recipes", json={"video_uri": "adapters/tenant-acme/text/v1/adapter_config.json"}, timeout=60
            ),
            404,
            "not_found",
        ),  # another tenant's adapter is not media, nor learnable
        (requests.post(f"{url}/v1/recipes", json={"video_uri": "tenants.json"}, timeout=60), 404, "not_found"),
        (
            requests.post(
                f"{url}/v1/generate", json={"modality": "text", "question": "Hi?", "adapter": "nope"}, timeout=60
            ),
            404,
            "unknown_adapter",
        ),
        (
            requests.post(
                f"{url}/v1/generate", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=60
            ),
            400,
            "bad_json",
        ),
        (requests.get(f"{url}/v1/nothing", timeout=60), 404, "not_found"),
        (
            requests.post(
                f"{url}/v1/generate",
                json={"modality": "text", "question": "Hi?", "adapter": "ddft/video/v1"},
                timeout=60,
            ),
            422,
            "adapter_modality",
        ),
        (
            requests.post(
                f"{url}/v1/generate", json={"modality": "text", "question": "Hi?", "max_new_tokens": 10**6}, timeout=60
            ),
            400,
            "bad_max_new_tokens",
        ),
    ]
    for resp, status, error in checks:
        assert resp.status_code == status, resp.text
        assert resp.json()["detail"] and (error is None or resp.json()["error"] == error), resp.text
    for resp, _, _ in checks:
        assert store.uri not in resp.text and str(store.local_path()) not in resp.text, resp.text  # no store location
    chat = requests.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        json={
            "model": "tiny",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "datasets/raw/x\0.png"}},
                    ],
                }
            ],
        },
    )
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "bad_uri", chat.text
    models = requests.get(f"{url}/v1/models", headers={"Authorization": "Basic xyz"}, timeout=60)
    assert models.status_code == 401 and models.json()["error"]["code"] == "bad_authorization"  # OpenAI's shape
    with pytest.raises(client.ClientError, match="bad_modality"):
        client.generate(url, "video", "recipe?")
    assert client.health(url)["status"] == "ok"
    assert client.generate(url, "text", "Still there?")["adapter"] == "ddft/text/v1"


@pytest.mark.integration
def test_chunked_bodies_over_the_limit_are_refused_on_every_body_route(app_url):
    """No Content-Length (chunked): the cap still holds on each route that reads a body (the app's
    limits: media 1 MB, adapters 2 MB), and the server is fine afterwards."""
    url, _, keys, _ = app_url

    def chunked(first: bytes = b"", mb: int = 4):
        yield first
        for _ in range(mb * 16):
            yield b"0" * 65536

    boundary = "ddftboundary"
    multipart = f"multipart/form-data; boundary={boundary}"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{{}}"; filename="f"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    acme = {"Authorization": f"Bearer {keys['acme']}"}
    cases = [
        ("POST", "/v1/recipes", multipart, part.format("video").encode(), {}),
        ("POST", "/v1/recipes", "application/json", b'{"video_uri": "', {}),
        ("POST", "/v1/generate", "application/json", b'{"modality": "image", "image_b64": "', {}),
        ("POST", "/v1/chat/completions", "application/json", b'{"model": "tiny", "messages": "', {}),
        ("PUT", "/v1/adapters/big", multipart, part.format("adapter_model.safetensors").encode(), acme),
        ("PUT", "/v1/adapters/big?modality=text", "application/x-tar", b"", acme),
    ]
    for method, path, ctype, first, headers in cases:
        resp = requests.request(
            method, f"{url}{path}", data=chunked(first), timeout=60, headers={"Content-Type": ctype, **headers}
        )
        assert resp.status_code == 413, (path, resp.status_code, resp.text[:300])
        error = resp.json()["error"]
        assert (error["code"] if isinstance(error, dict) else error) == "too_large", resp.text
    assert client.health(url)["status"] == "ok"
    assert client.generate(url, "text", "Still there?")["adapter"] == "ddft/text/v1"


@pytest.mark.integration
def test_lru_eviction_and_reload_and_metrics(app_url):
    """Six adapters through a cache of four: evictions, then a reloaded adapter answers as before."""
    url, store, keys, tmp = app_url
    names = [f"lru{i}" for i in range(3)]
    for i, name in enumerate(names):
        client.upload_adapter(url, name, adapter_folder(store, tmp / name, seed=30 + i), "text", api_key=keys["beta"])
    first = client.generate(url, "text", "Boil an egg?", api_key=keys["beta"], adapter="lru0")
    for name in names[1:] + ["ddft/text/v1"]:
        client.generate(url, "text", "Boil an egg?", api_key=keys["beta"], adapter=name)
    client.generate(url, "image", image_bytes=make_png())
    client.post_recipe(url, make_mp4())
    again = client.generate(url, "text", "Boil an egg?", api_key=keys["beta"], adapter="lru0")
    assert again["answer"] == first["answer"] and again["adapter"] == "tenant-beta/lru0/v1"
    client.generate(url, "text", "Boil an egg?", api_key=keys["beta"], adapter="lru0")  # resident now: a hit
    assert client.health(url) == {"status": "ok"}  # probes see no tenant's adapters
    assert len(client.health(url, admin_key=ADMIN_KEY)["loaded_adapters"]) <= 4
    metrics = requests.get(f"{url}/metrics", timeout=60).text
    assert "tenant-" not in metrics  # nor does a scrape: tenants' adapters are opaque hashes

    def value(name: str) -> float:
        return sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )

    assert value("ddft_adapter_evictions_total") >= 1 and value("ddft_adapter_loads_total") >= 6
    assert value("ddft_adapter_misses_total") >= 6 and value("ddft_adapter_hits_total") >= 1
    lru0 = adapter_label("tenant-beta/lru0/v1")
    assert f'adapter="{lru0}"' in metrics and 'modality="text"' in metrics and 'adapter="ddft/text/v1"' in metrics
    assert "ddft_queue_depth" in metrics and "ddft_request_latency_seconds_bucket" in metrics
    assert value(f'ddft_tokens_total{{adapter="{lru0}",kind="completion",modality="text"}}') > 0
    client.delete_adapter(url, "lru0", api_key=keys["beta"])


@pytest.mark.integration
def test_the_page_gets_the_newest_eval_chart(app_url):
    """GET /eval/latest.png (the page's picture): 404 no_eval_chart before `ddft eval` saved one,
    then the newest eval/<time>.png's bytes."""
    url, store, _, _ = app_url
    none = requests.get(f"{url}/eval/latest.png", timeout=60)
    assert none.status_code == 404 and none.json()["error"] == "no_eval_chart"
    store.write_bytes("eval/20260101-000000.png", make_png())
    newest = make_png()[:-12] + b"newest chart"  # bytes served as stored: only the newest's
    store.write_bytes("eval/20261130-120000.png", newest)
    got = requests.get(f"{url}/eval/latest.png", timeout=60)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png" and got.content == newest
    store.delete("eval")


def test_the_decoder_samples_a_video_as_its_adapter_was_trained():
    """Sampling.of(manifest): the manifest's frames and strategy ("steps" needs a recipe's step spans,
    which a served video lacks: uniform); none recorded (the base, an upload): 8 uniform."""
    import asyncio
    from types import SimpleNamespace

    from serve.decoder import Decoder, Sampling

    assert Sampling.of(None) == Sampling(8, "uniform")
    assert Sampling.of(SimpleNamespace(frames=None, frame_strategy=None)) == Sampling(8, "uniform")
    assert Sampling.of(SimpleNamespace(frames=16, frame_strategy="steps")) == Sampling(16, "uniform")
    assert Sampling.of(SimpleNamespace(frames=4, frame_strategy="keyframe")) == Sampling(4, "keyframe")
    decode = Decoder()
    try:
        for sampling in (Sampling(4, "uniform"), Sampling(6, "keyframe")):
            assert asyncio.run(decode("video", make_mp4(frames=16), sampling)).shape[0] == sampling.frames
    finally:
        decode._reset()


def test_backpressure_is_503_with_retry_after():
    """The gateway turns Serve's full-queue error into 503 + Retry-After (and a dead replica, after
    retries, too), for plain and streamed calls alike."""
    import asyncio
    from types import SimpleNamespace

    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from ddft.engines.base import GenerateRequest
    from serve.errors import Overloaded, to_http
    from serve.replicas import Replicas

    class Handle:
        def __init__(self, exc):
            self.exc = exc
            self.generate = SimpleNamespace(remote=lambda req: self._fail())
            self.stream = SimpleNamespace(remote=lambda req: self)  # a response generator that fails

        def options(self, **_):
            return self

        async def _fail(self):
            raise self.exc

        def __anext__(self):
            return self._fail()

        def cancel(self):
            pass

    async def first_chunk(replicas, req):
        return await anext(replicas.stream(req))

    for exc in (BackPressureError(num_queued_requests=9, max_queued_requests=8), RayActorError()):
        for call in (Replicas.generate, first_chunk):
            with pytest.raises(Overloaded) as err:
                asyncio.run(call(Replicas(Handle(exc), 5), GenerateRequest("text", "hi")))
            http = to_http(err.value)
            assert http.status == 503 and int(http.headers["Retry-After"]) > 0


def test_a_client_that_goes_away_is_not_logged_as_an_error(caplog):
    """bench-serve's streams leave after their first token: Serve cancels the request's task, and the
    TaskCancelledError reached the catch-all handler, logged with a traceback as "unexpected error".
    A disconnect is normal: an info line, no error record; a real bug still gets its traceback."""
    import logging

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from ray.exceptions import TaskCancelledError

    from serve import errors

    app = FastAPI()
    errors.install(app)

    @app.get("/gone")
    async def gone():
        raise TaskCancelledError()

    @app.get("/bug")
    async def bug():
        raise KeyError("oops")

    http = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="ddft.serve"):
        assert http.get("/gone").status_code == 499
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("client went away" in r.getMessage() for r in caplog.records)
        assert http.get("/bug").status_code == 500
        assert [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


def test_engine_errors_map_to_http_from_one_table():
    """What a replica raises arrives wrapped by Ray (also an instance of the original type): the
    status and code come from serve/errors.py's table, the detail is the original message only."""
    from ray.exceptions import RayTaskError

    from ddft.adapters.registry import AdapterError
    from ddft.engines.base import EngineBusy, EngineUnavailable
    from ddft.errors import NotFound
    from ddft.store import StoreError
    from serve import errors

    def raised_in_a_replica(exc):
        try:
            raise exc
        except Exception as err:
            return RayTaskError("stream", "Traceback (most recent call last): ...", err).as_instanceof_cause()

    store_down = errors.to_http(
        errors.from_replica(raised_in_a_replica(StoreError("s3://bucket/adapters at http://10.0.0.5:9000 down")))
    )
    assert (store_down.status, store_down.error) == (502, "store_error")  # no store location reaches a client
    assert "bucket" not in store_down.detail and "10.0.0.5" not in store_down.detail and "log" in store_down.detail
    for exc, status, code in (
        (AdapterError("adapter x: wrong base"), 409, "adapter_unusable"),
        (EngineUnavailable("no GPU"), 503, "engine_unavailable"),
        (EngineBusy("256 requests are already waiting"), 503, "engine_busy"),
        (ValueError("the question is empty"), 400, "bad_request"),
        (RuntimeError("CUDA error"), 500, "generation_failed"),
    ):
        wrapped = raised_in_a_replica(exc)
        assert isinstance(wrapped, type(exc))
        err = errors.to_http(errors.from_replica(wrapped))
        assert (err.status, err.error) == (status, code) and str(exc) in err.detail and "Traceback" not in err.detail
    assert errors.to_http(errors.from_replica(EngineUnavailable("no GPU"))).headers["Retry-After"]
    assert errors.to_http(errors.from_replica(EngineBusy("full"))).headers["Retry-After"]
    model = errors.to_http(NotFound("no such model", "model_not_found"))
    assert errors.body(model, "/v1/chat/completions") == {
        "error": {"message": "no such model", "type": "invalid_request_error", "code": "model_not_found", "param": None}
    }
    assert errors.body(errors.to_http(NotFound("no such adapter", "unknown_adapter")), "/v1/generate") == {
        "error": "unknown_adapter",
        "detail": "no such adapter",
    }


def test_openapi_document_is_current_and_complete():
    """docs/openapi.json is what the app generates (`make openapi` after changing a route), and
    every route is described, with its request body where it takes one."""
    import json

    from serve.export_openapi import REPO, document

    doc = json.loads(json.dumps(document()))
    assert json.loads((REPO / "docs" / "openapi.json").read_text()) == doc, "run `make openapi`"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("description") or op.get("summary"), (method, path)
    for path in ("/v1/recipes", "/v1/generate", "/v1/chat/completions", "/v1/adapters/{name}"):
        method = "put" if "adapters" in path else "post"
        assert doc["paths"][path][method]["requestBody"]["content"], path
