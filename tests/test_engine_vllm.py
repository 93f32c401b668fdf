"""The vllm engine on a CPU machine without vLLM: lazy imports, the three refusals (each saying why
and what to use instead), request translation, and the engine's bookkeeping over a fake vLLM."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddft.adapters import registry
from ddft.adapters.registry import AdapterError
from ddft.engines.base import Engine, GenerateRequest, make_engine
from ddft.engines.vllm import ARCHITECTURES, EngineUnavailable, LoraIds, VLLMEngine, lora_args, sampling_args, to_prompt
from ddft.models.load import base_info, ensure_base
from ddft.store import Store

NEXT_VIDEO, QWEN = "LlavaNextVideoForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"
Q = "What is the dish in this image?"


def test_importing_the_engines_does_not_import_vllm():
    code = ("import sys, ddft.engines.base, ddft.engines.vllm, ddft.engines.hf; "
            "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


# -- refusals -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("vllm") / "store"))
    ensure_base(store, "tiny", build="tiny")  # a Video-LLaVA
    return store


def fake_base(store: Store, model_id: str = "nv", arch: str = NEXT_VIDEO) -> Store:
    """A base as base_info sees it (config.json + ddft_base.json), without weights."""
    store.write_json(f"models/{model_id}/config.json", {"architectures": [arch], "model_type": "llava_next_video"})
    store.write_json(f"models/{model_id}/ddft_base.json", {"id": model_id, "fingerprint": "f" * 64, "origin": "test"})
    return store


def test_video_llava_base_is_refused_for_its_architecture(tiny_store):
    for build in (lambda: VLLMEngine(tiny_store, "tiny"),
                  lambda: make_engine("vllm", store=tiny_store, base_model_id="tiny")):
        with pytest.raises(EngineUnavailable, match="vLLM 0.33 has no Video-LLaVA model") as err:
            build()
        msg = str(err.value)
        assert "engine 'hf'" in msg and "LLaVA-NeXT-Video" in msg and "Qwen2.5-VL" in msg  # the way out


def test_unknown_architecture_is_refused(tmp_path):
    store = fake_base(Store(str(tmp_path)), arch="MysteryForCausalLM")
    with pytest.raises(EngineUnavailable, match="'MysteryForCausalLM'.*does not serve"):
        VLLMEngine(store, "nv")


def test_supported_base_without_vllm_installed_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, even where it is installed
    with pytest.raises(EngineUnavailable, match="vLLM is not installed in this environment") as err:
        VLLMEngine(fake_base(Store(str(tmp_path))), "nv")
    assert "pip install 'ddft[vllm]'" in str(err.value) and "engine 'hf'" in str(err.value)


def test_supported_base_without_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store = fake_base(Store(str(tmp_path)))
    with pytest.raises(EngineUnavailable, match="vLLM needs a CUDA GPU; this machine has none") as err:
        VLLMEngine(store, "nv")
    assert "engine 'hf' (CPU or GPU)" in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(EngineUnavailable, match="needs a CUDA GPU"):  # a GPU, but the engine was told cpu
        VLLMEngine(store, "nv", device="cpu")


# -- translation ----------------------------------------------------------------------------------------
def _req(modality, **kw):
    pixels = {"image": np.full((32, 48, 3), 7, np.uint8), "video": np.zeros((8, 32, 32, 3), np.uint8)}.get(modality)
    return GenerateRequest(modality=modality, question=Q, pixels=pixels, **kw)


def test_prompts_for_llava_next_video():
    video = to_prompt(NEXT_VIDEO, _req("video"))
    assert video["prompt"] == f"USER: <video>\n{Q} ASSISTANT:"  # ddft's training format too
    assert video["multi_modal_data"]["video"].shape == (8, 32, 32, 3)
    assert to_prompt(NEXT_VIDEO, _req("text")) == {"prompt": f"USER: {Q} ASSISTANT:"}
    with pytest.raises(ValueError, match="LLaVA-NeXT-Video takes no image"):  # vLLM's model is text + video
        to_prompt(NEXT_VIDEO, _req("image"))


def test_prompts_for_qwen2_5_vl():
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    tail = f"{Q}<|im_end|>\n<|im_start|>assistant\n"
    video = to_prompt(QWEN, _req("video"))
    assert video["prompt"] == head + "<|vision_start|><|video_pad|><|vision_end|>" + tail
    image = to_prompt(QWEN, _req("image"))
    assert image["prompt"] == head + "<|vision_start|><|image_pad|><|vision_end|>" + tail
    pil = image["multi_modal_data"]["image"]
    assert pil.size == (48, 32) and pil.mode == "RGB" and pil.getpixel((0, 0)) == (7, 7, 7)
    assert to_prompt(QWEN, _req("text")) == {"prompt": head + tail}


def test_prompt_from_a_template_or_a_processor():
    assert to_prompt(QWEN, _req("image"), "<{media}|{question}>")["prompt"] == \
        f"<<|vision_start|><|image_pad|><|vision_end|>|{Q}>"
    seen = []
    proc = SimpleNamespace(apply_chat_template=lambda msgs, **kw: seen.append((msgs, kw)) or "rendered")
    assert to_prompt(QWEN, _req("video"), proc)["prompt"] == "rendered"
    assert seen[0][0][0]["content"] == [{"type": "video"}, {"type": "text", "text": Q}]
    assert seen[0][1] == {"tokenize": False, "add_generation_prompt": True}


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="video pixels must be"):
        to_prompt(QWEN, GenerateRequest(modality="video", question=Q, pixels=np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(ValueError, match="text request carries no pixels"):
        to_prompt(QWEN, GenerateRequest(modality="text", question=Q, pixels=np.zeros((2, 2, 3), np.uint8)))
    with pytest.raises(ValueError, match="question is empty"):
        to_prompt(QWEN, GenerateRequest(modality="text", question="  "))
    with pytest.raises(ValueError, match="has no \\{media\\}"):
        to_prompt(QWEN, _req("image"), "{question}")
    with pytest.raises(ValueError, match="temperature"):
        sampling_args(_req("text", temperature=-1))


def test_every_architecture_has_a_placeholder_for_what_it_takes():
    for name, arch in ARCHITECTURES.items():
        assert "{media}" in arch.template and "{question}" in arch.template, name
        assert arch.image or arch.video, name


def test_sampling_args():
    assert sampling_args(_req("text", max_new_tokens=12, seed=3)) == \
        {"temperature": 0.0, "max_tokens": 12, "stop": [], "seed": None}  # greedy: a seed changes nothing
    assert sampling_args(_req("text", temperature=0.7, seed=3)) == \
        {"temperature": 0.7, "max_tokens": 96, "stop": [], "seed": 3}
    assert sampling_args(_req("text", stop=["\n\n", "Q:"]))["stop"] == ["\n\n", "Q:"]


def _manifest(ref_name="video", version=1, sha="a" * 64, **kw):
    fields = dict(name=ref_name, owner="ddft", version=version, modality="video", base_model_id="nv",
                  base_fingerprint="f" * 64, rank=8, alpha=16, target_modules=["q_proj"], weights_sha256=sha,
                  source="trained")
    return registry.Manifest(**(fields | kw))


def test_lora_args_and_stable_ids(tmp_path):
    ids = LoraIds()
    a, b = _manifest("video"), _manifest("text", modality="text")
    first = ids(a)
    assert (first, ids(b), ids(a), ids(b)) == (1, 2, 1, 2)  # stable per ref, distinct across refs, >= 1
    assert ids(_manifest("video", sha="b" * 64)) == 3  # other weights under the same ref: a new id
    assert lora_args(a, tmp_path, first) == {"lora_name": "ddft/video/v1", "lora_int_id": 1, "lora_path": str(tmp_path)}
    with pytest.raises(ValueError, match="1 or more"):
        lora_args(a, tmp_path, 0)


# -- the engine over a fake vLLM ------------------------------------------------------------------------
@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm.LLM / SamplingParams / LoRARequest stand-ins that record what the engine asks for."""
    calls = {"generate": [], "removed": []}

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw
            self.llm_engine = SimpleNamespace(remove_lora=calls["removed"].append)

        def generate(self, inputs, params, lora_request=None, use_tqdm=True):
            # vLLM reads an adapter's files while it runs the batch: they must be there now
            there = [r and (r.lora_path / "adapter_model.safetensors").exists() for r in lora_request]
            calls["generate"].append((inputs, params, lora_request, there))
            return [SimpleNamespace(prompt_token_ids=[0] * 5, outputs=[SimpleNamespace(
                text=f" answer {i} ", token_ids=[1] * p.kw["max_tokens"], finish_reason="length" if i else "stop")])
                for i, p in enumerate(params)]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: SimpleNamespace(kw=kw)
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda lora_name, lora_int_id, lora_path: SimpleNamespace(
        lora_name=lora_name, lora_int_id=lora_int_id, lora_path=Path(lora_path))
    for name, module in (("vllm", vllm), ("vllm.lora", types.ModuleType("vllm.lora")), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def _publish(store, tmp_path, name, modality, **cfg):
    from safetensors.torch import save_file

    d = tmp_path / f"adapter-{name}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                       "target_modules": ["q_proj"], **cfg}))
    save_file({"w": torch.full((2,), float(len(name)))}, str(d / "adapter_model.safetensors"))
    return registry.publish(store, d, owner="ddft", name=name, modality=modality, base=base_info(store, "nv"),
                            source="trained")


def test_engine_batches_adapters_and_keeps_an_lru(tmp_path, fake_vllm):
    store = fake_base(Store(str(tmp_path / "store")))
    video, text = _publish(store, tmp_path, "video", "video"), _publish(store, tmp_path, "text", "text")
    engine = make_engine("vllm", store=store, base_model_id="nv", cache_size=1, max_lora_rank=16)
    assert isinstance(engine, Engine)
    init = fake_vllm["init"]
    assert (init["enable_lora"], init["max_loras"], init["max_lora_rank"], init["dtype"]) == (True, 1, 16, "auto")
    assert init["model"] == str(tmp_path / "store" / "models" / "nv") and "max_model_len" not in init

    reqs = [_req("video", adapter=video, max_new_tokens=3), _req("text", adapter=text, max_new_tokens=4),
            _req("text", temperature=0.5, seed=1)]
    results = engine.generate(reqs)
    inputs, params, loras, files_there = fake_vllm["generate"][0]
    assert [i["prompt"] for i in inputs] == [f"USER: <video>\n{Q} ASSISTANT:"] + [f"USER: {Q} ASSISTANT:"] * 2
    assert [p.kw["temperature"] for p in params] == [0.0, 0.0, 0.5]
    assert [lr and (lr.lora_name, lr.lora_int_id) for lr in loras] == [
        ("ddft/video/v1", 1), ("ddft/text/v1", 2), None]
    assert files_there == [True, True, None]  # two adapters in a cache of one: both pinned for the batch
    assert [(r.text, r.adapter, r.base, r.finish_reason) for r in results] == [
        ("answer 0", "ddft/video/v1", "nv", "stop"), ("answer 1", "ddft/text/v1", "nv", "length"),
        ("answer 2", None, "nv", "length")]
    assert results[1].timings | {"adapter_load_s": 0, "generate_s": 0} == {
        "adapter_load_s": 0, "generate_s": 0, "batch_size": 3, "adapters_in_batch": 2, "prompt_tokens": 5,
        "new_tokens": 4}
    assert engine.loaded_adapters() == ["ddft/text/v1"]  # back to the cache size after the batch
    assert fake_vllm["removed"] == [1] and not loras[0].lora_path.exists()

    engine.generate([_req("video", adapter=video)])  # evicted and back: the same int id
    assert fake_vllm["generate"][1][2][0].lora_int_id == 1
    assert engine.evict_adapter("ddft/video/v1") and not engine.evict_adapter("ddft/video/v1")
    assert engine.loaded_adapters() == []
    stats = engine.stats()
    assert (stats["requests"], stats["prompt_tokens"], stats["new_tokens"]) == (4, 20, 3 + 4 + 96 + 96)
    assert (stats["adapter_loads"], stats["adapter_misses"], stats["adapter_evictions"]) == (3, 3, 3)


def test_engine_refuses_adapters_it_cannot_apply(tmp_path, fake_vllm):
    store = fake_base(Store(str(tmp_path / "store")))
    engine = VLLMEngine(store, "nv", max_lora_rank=4)
    projector = _publish(store, tmp_path, "image", "image", modules_to_save=["multi_modal_projector"])
    with pytest.raises(AdapterError, match="modules_to_save.*engine 'hf'"):
        engine.load_adapter(projector)
    with pytest.raises(AdapterError, match="rank 8, above this engine's max_lora_rank 4"):
        engine.load_adapter(_publish(store, tmp_path, "text", "text"))
    with pytest.raises(AdapterError, match="made for base"):
        engine.load_adapter(_manifest(base_fingerprint="0" * 64))
    with pytest.raises(AdapterError, match="request 0: adapter ddft/text/v1 is for text"):
        engine.generate([_req("video", adapter=_manifest("text", modality="text"))])
    assert engine.loaded_adapters() == [] and fake_vllm["generate"] == []
