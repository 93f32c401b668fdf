"""The app with `serve.engine: vllm`: the model replicas run on vLLM's own interpreter (Ray's
py_executable) with real vLLM, and the same HTTP contract holds, read by the official openai client:
plain and streamed chat with `<base>:<adapter>` models and an image part, recipes streamed, the
answers the same as the hf engine's (under the recipe grammar), every recipe valid against the published
schema, response_format, eight clients at once answered each as alone, and a bad vLLM environment refused before
anything starts."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ddft.config import ConfigError, ServeSettings
from tests.serve_fixture import ADMIN_KEY, make_mp4, make_png, running_app
from tests.test_serve import check_recipes, check_response_format
from tests.test_streaming import (
    QUESTION,
    _check_stream,
    _events,
    _openai,
    _plain_and_streamed,
    check_engine_figures,
    check_openai_fields,
    image_question,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    with running_app(
        tmp_path_factory.mktemp("serve-vllm"),
        max_new_tokens=16,
        engine="vllm",
        vllm={"max_model_len": 1024, "kv_cache_gib": 1},
    ) as app:
        yield app


def test_openai_client_plain_and_streamed_on_vllm(app):
    client = _openai(app)
    plain, chunks = _plain_and_streamed(client, model="tiny:ddft/text/v1", messages=QUESTION, max_tokens=16)
    assert plain.model == "tiny:ddft/text/v1" and 0 < plain.usage.completion_tokens <= 16
    _check_stream(plain, chunks)
    plain, chunks = _plain_and_streamed(client, model="tiny:ddft/image/v1", messages=image_question(), max_tokens=12)
    assert plain.model == "tiny:ddft/image/v1"
    _check_stream(plain, chunks)
    health = requests.get(f"{app.url}/healthz", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
    assert health["status"] == "ok" and "ddft/image/v1" in health["loaded_adapters"]


def test_recipes_on_vllm_stream_and_answer_like_the_hf_engine(app):
    """The same routing and the same greedy recipe as the hf engine gives for that video."""
    import numpy as np

    from ddft.adapters.registry import read_manifest
    from ddft.data.media import sample_frames
    from ddft.engines.base import GenerateRequest
    from ddft.engines.grammar import Constraint
    from ddft.engines.hf import HFEngine
    from ddft.prompts import QUESTIONS

    uri = "datasets/raw/clips/one.mp4"
    plain = requests.post(f"{app.url}/v1/recipes", json={"video_uri": uri}, timeout=120).json()
    events = _events(
        requests.post(f"{app.url}/v1/recipes?stream=true", json={"video_uri": uri}, stream=True, timeout=120)
    )
    deltas = [json.loads(data)["text"] for name, data in events if name == "delta"]
    (recipe,) = [json.loads(data) for name, data in events if name == "recipe"]
    assert "".join(deltas) == recipe["text"] == plain["text"] and plain["adapter"] == "ddft/video/v1"
    frames = sample_frames(app.store.read_bytes(uri), 8)
    adapter = read_manifest(app.store, "ddft", "video")
    request = GenerateRequest(
        "video", QUESTIONS["video"], np.asarray(frames), adapter, 16, constraint=Constraint.recipe()
    )
    hf = HFEngine(app.store, "tiny").generate([request])[0]
    assert plain["text"] == hf.text  # both under the recipe grammar


def test_every_recipe_on_vllm_validates_against_the_published_schema(app):
    check_recipes(app.url, app.store)


def test_openai_response_format_on_vllm(app):
    check_response_format(_openai(app))


def test_openai_fields_on_vllm_and_logprobs_equal_to_the_hf_engine(app):
    """The same fields honoured and refused as on hf; the greedy tokens' log-probabilities (and
    their alternatives) vLLM served equal the hf engine's within 1e-3."""
    from ddft.adapters.registry import read_manifest
    from ddft.engines.base import GenerateRequest
    from ddft.engines.hf import HFEngine

    plain = check_openai_fields(app)
    request = GenerateRequest(
        "text", QUESTION[0]["content"], adapter=read_manifest(app.store, "ddft", "text"), max_new_tokens=8, logprobs=3
    )
    hf = HFEngine(app.store, "tiny").generate([request])[0]
    served = plain.choices[0].logprobs.content
    assert [lp.token for lp in served] == [lp.token for lp in hf.logprobs]
    for ours, theirs in zip(served, hf.logprobs, strict=True):
        assert abs(ours.logprob - theirs.logprob) < 1e-3
        assert [t.token for t in ours.top_logprobs] == [t.token for t in theirs.top]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.top_logprobs, theirs.top, strict=True)) < 1e-3


def test_the_widest_upload_the_gateway_accepts_is_served_by_vllm_like_hf(app):
    """A tenant's LoRA at the rank cap (serve.max_lora_rank) on every Linear of the language model (attention and
    MLP: all that adapters/upload.py lets through), uploaded over HTTP, is loaded by the vLLM replica and answers
    as the hf engine does with the same adapter."""
    from ddft import client
    from ddft.adapters.registry import read_manifest
    from ddft.engines.base import GenerateRequest
    from ddft.engines.hf import HFEngine
    from tests.test_engine_hf import lora_folder

    rank = ServeSettings().max_lora_rank
    every_linear = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    folder = lora_folder(app.store, app.tmp / "acme-wide", 21, r=rank, lora_alpha=rank, target_modules=every_linear)
    up = client.upload_adapter(app.url, "wide", folder, "text", api_key=app.keys["acme"])
    assert up["adapter"] == "tenant-acme/wide/v1"
    question = "How long do I boil an egg?"
    answer = client.generate(app.url, "text", question, api_key=app.keys["acme"], adapter="wide")
    assert answer["adapter"] == "tenant-acme/wide/v1"
    manifest = read_manifest(app.store, "tenant-acme", "wide")
    assert manifest.rank == rank
    assert {"gate_proj", "down_proj"} <= {t.rsplit(".", 1)[-1] for t in manifest.target_modules}
    hf = HFEngine(app.store, "tiny").generate([GenerateRequest("text", question, None, manifest, 16)])[0]
    assert answer["answer"] == hf.text


def _ask(app, path: str, stream: bool, key: str | None = None, **send) -> tuple[str, str, str]:
    """(text, finish_reason, adapter) of one call to the app over HTTP, plain or streamed (SSE): chat
    completions, /v1/generate or /v1/recipes; a stream's text is its deltas joined."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if path == "/v1/recipes" and stream:
        path += "?stream=true"
    resp = requests.post(f"{app.url}{path}", headers=headers, stream=stream, timeout=(5, 240), **send)
    if not stream:
        assert resp.status_code == 200, resp.text
        out = resp.json()
        if path == "/v1/chat/completions":
            (choice,) = out["choices"]
            return choice["message"]["content"], choice["finish_reason"], out["adapter"]
        return out["text" if path == "/v1/recipes" else "answer"], out["finish_reason"], out["adapter"]
    events = _events(resp)
    assert events[-1] == (None, "[DONE]") and "error" not in [name for name, _ in events], events
    if path.startswith("/v1/recipes"):
        (recipe,) = [json.loads(data) for name, data in events if name == "recipe"]
        text = "".join(json.loads(data)["text"] for name, data in events if name == "delta")
        assert text == recipe["text"]
        return text, recipe["finish_reason"], recipe["adapter"]
    chunks = [json.loads(data) for _, data in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    (last,) = [c for c in chunks if c.get("adapter")]  # the last content chunk: finish_reason, adapter
    return text, last["choices"][0]["finish_reason"], last["adapter"]


@pytest.mark.timeout(420)  # run alone, the module's vLLM app starts inside it (40 s); 16 answers on 2 cores
def test_eight_concurrent_clients_on_vllm_each_answered_as_alone(app):
    """Eight HTTP clients at once on vLLM (continuous batching, multi-LoRA): the platform's image, video and text
    adapters and a tenant's, by the base id's routing and by name; chat with text, an image and a video, /v1/generate
    and recipes; streamed and not; all greedy. Each answer (a stream's deltas joined), its finish reason and the
    adapter that gave it are the request's own answer alone."""
    clip, png = make_mp4(8, 224), base64.b64encode(make_png()).decode()  # another clip than the store's
    video = [{"type": "text", "text": "What is cooked here?"}]
    video.append({"type": "video_url", "video_url": {"url": "datasets/raw/clips/one.mp4"}})

    def chat(model: str, messages: list[dict], stream: bool, key: str | None = None, tokens: int = 16):
        body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": stream}
        return ("/v1/chat/completions", stream, key, {"json": body})

    calls = [  # (path, stream, tenant key, what requests.post sends)
        chat("tiny", QUESTION, False),  # the base id: routing picks the platform's text adapter
        chat("tiny", QUESTION, True, app.keys["acme"]),  # ... and acme's own text adapter for acme
        chat("tiny:ddft/text/v1", [{"role": "user", "content": "How much salt goes in pasta water?"}], True, None, 12),
        ("/v1/generate", False, None, {"json": {"modality": "image", "image_b64": png, "adapter": "ddft/image/v1"}}),
        chat("tiny", image_question(), True, app.keys["beta"]),  # beta has no adapter: the platform's image one
        chat("tiny:ddft/video/v1", [{"role": "user", "content": video}], True),
        ("/v1/recipes", False, None, {"json": {"video_uri": "datasets/raw/clips/one.mp4", "temperature": 0}}),
        ("/v1/recipes", True, app.keys["acme"], {"files": {"video": ("clip.mp4", clip)}}),
    ]
    alone = [_ask(app, path, stream, key, **send) for path, stream, key, send in calls]
    adapters = ["ddft/text/v1", "tenant-acme/text/v1", "ddft/text/v1"] + ["ddft/image/v1"] * 2 + ["ddft/video/v1"] * 3
    assert [adapter for _, _, adapter in alone] == adapters
    assert {reason for _, reason, _ in alone} <= {"stop", "length"}

    start = threading.Barrier(len(calls))
    spans: list[tuple[float, float]] = []

    def at_once(call) -> tuple[str, str, str]:
        path, stream, key, send = call
        start.wait(timeout=60)
        t0 = time.monotonic()
        out = _ask(app, path, stream, key, **send)
        spans.append((t0, time.monotonic()))
        return out

    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(at_once, calls, timeout=300))
    assert max(t0 for t0, _ in spans) < min(t1 for _, t1 in spans)  # all eight were in flight at once
    for call, one, both in zip(calls, alone, together):
        assert both == one, (call[0], call[1], call[3].get("json", {}).get("model"))


def test_a_vllm_environment_that_is_missing_or_wrong_is_refused_with_the_fix(tmp_path):
    from serve.app import vllm_python

    with pytest.raises(ConfigError, match="make venv-vllm"):
        vllm_python(ServeSettings(engine="vllm", vllm={"python": str(tmp_path / "nope/bin/python")}))
    import sys

    with pytest.raises(ConfigError, match="vLLM no"):  # the project's own venv: Ray, no vLLM
        vllm_python(ServeSettings(engine="vllm", vllm={"python": sys.executable}))
    assert Path(vllm_python(ServeSettings(engine="vllm"))).exists()


@pytest.mark.integration
def test_engine_figures_reach_metrics_under_load_on_vllm(app):
    """The same series as the hf engine's (test_streaming), from vLLM's own scheduler stats."""
    check_engine_figures(app, "vllm")
