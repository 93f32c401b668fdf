"""The app with `serve.engine: vllm`: the model replicas run on vLLM's own interpreter (Ray's
py_executable) with real vLLM, and the same HTTP contract holds, read by the official openai client:
plain and streamed chat with `<base>:<adapter>` models and an image part, recipes streamed, the
answers the same as the hf engine's (under the recipe grammar), every recipe valid against the published
schema, response_format, and a bad vLLM environment refused before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from ddft.config import ConfigError, ServeSettings
from tests.serve_fixture import ADMIN_KEY, running_app
from tests.test_serve import check_recipes, check_response_format
from tests.test_streaming import QUESTION, _check_stream, _events, _openai, _plain_and_streamed, image_question

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


def test_a_vllm_environment_that_is_missing_or_wrong_is_refused_with_the_fix(tmp_path):
    from serve.app import vllm_python

    with pytest.raises(ConfigError, match="make venv-vllm"):
        vllm_python(ServeSettings(engine="vllm", vllm={"python": str(tmp_path / "nope/bin/python")}))
    import sys

    with pytest.raises(ConfigError, match="vLLM no"):  # the project's own venv: Ray, no vLLM
        vllm_python(ServeSettings(engine="vllm", vllm={"python": sys.executable}))
    assert Path(vllm_python(ServeSettings(engine="vllm"))).exists()
