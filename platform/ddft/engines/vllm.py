"""The `vllm` engine: a base vLLM serves, with LoRA adapters as one LoRARequest per request.

vLLM 0.33 pins its own torch and transformers and needs a CUDA GPU, so it lives in its own
environment (`pip install 'ddft[vllm]'`) and is imported only inside the functions that use it:
importing this module (or `ddft.engines.base`) never imports vLLM. Where it can't start, the
engine raises `EngineUnavailable` saying why and what to use instead (mostly engine 'hf').

Requests become vLLM inputs through pure functions (`to_prompt`, `sampling_args`, `lora_args`)
that need neither vLLM nor a GPU, so they are tested on any machine.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddft.adapters import registry
from ddft.adapters.registry import AdapterError, Manifest
from ddft.config import JOINT, MODALITIES
from ddft.engines.base import STATS, AdapterCache, EngineUnavailable, check_base, GenerateRequest, GenerateResult
from ddft.models.load import base_info, local_base_dir, model_key
from ddft.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    name: str
    template: str  # the whole prompt, with {media} (the placeholder, "" for text) and {question}
    image: str | None  # an image's placeholder; None: vLLM takes no image for this model
    video: str | None  # a video's placeholder; None: vLLM takes no video for this model


# The prompt formats of vLLM's own examples for these models (the llava-hf / Qwen checkpoints).
# The LLaVA one is also ddft's training format (prompts.CHAT_TEMPLATE: "USER: <video>\nQ ASSISTANT:").
_USER = "USER: {media}{question} ASSISTANT:"
_QWEN = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{media}{question}"
         "<|im_end|>\n<|im_start|>assistant\n")
_QWEN_IMAGE, _QWEN_VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
ARCHITECTURES: dict[str, Arch] = {
    "LlavaNextVideoForConditionalGeneration": Arch("LLaVA-NeXT-Video", _USER, None, "<video>\n"),
    "LlavaOnevisionForConditionalGeneration": Arch(
        "LLaVA-OneVision", "<|im_start|>user {media}{question}<|im_end|><|im_start|>assistant\n",
        "<image>\n", "<video>\n"),
    "LlavaForConditionalGeneration": Arch("LLaVA", _USER, "<image>\n", None),
    "LlavaNextForConditionalGeneration": Arch("LLaVA-NeXT", "[INST] {media}{question} [/INST]", "<image>\n", None),
    "Qwen2VLForConditionalGeneration": Arch("Qwen2-VL", _QWEN, _QWEN_IMAGE, _QWEN_VIDEO),
    "Qwen2_5_VLForConditionalGeneration": Arch("Qwen2.5-VL", _QWEN, _QWEN_IMAGE, _QWEN_VIDEO),
}
# Known bases vLLM has no model for, with a clearer message than "unsupported architecture".
_NO_VLLM_MODEL = {"VideoLlavaForConditionalGeneration": "Video-LLaVA"}


def _supported() -> str:
    return ", ".join(f"{a.name} ({k})" for k, a in ARCHITECTURES.items())


def base_architecture(store: Store, base_model_id: str) -> str:
    """The base's architecture from its config.json in the store (no weights are read)."""
    base_info(store, base_model_id)  # a missing base gets the store's usual "not in the store" error
    archs = store.read_json(f"{model_key(base_model_id)}/config.json").get("architectures") or ["?"]
    return archs[0]


def check_architecture(arch: str, base_model_id: str) -> Arch:
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if arch in _NO_VLLM_MODEL:
        raise EngineUnavailable(
            f"base {base_model_id!r} is {_NO_VLLM_MODEL[arch]} ({arch}): vLLM 0.33 has no {_NO_VLLM_MODEL[arch]} "
            f"model; serve it with engine 'hf', or choose a base vLLM supports ({_supported()})")
    raise EngineUnavailable(
        f"base {base_model_id!r} has architecture {arch!r}, which the vllm engine does not serve; serve it with "
        f"engine 'hf' if it is a Video-LLaVA, or choose a base vLLM supports ({_supported()})")


# -- request translation (pure: no vLLM, no GPU) -------------------------------------------------------
def to_prompt(arch: str, request: GenerateRequest, processor_or_template=None) -> dict:
    """vLLM's input for one request: {"prompt": str} plus {"multi_modal_data": {"video": (T,H,W,3)
    uint8 array} or {"image": PIL.Image}} for media requests.

    The prompt comes from the architecture's template (None), a template string with {media} and
    {question}, or a processor/tokenizer whose own chat template renders the message.
    """
    spec = ARCHITECTURES[arch]
    modality = request.modality
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}; use one of {list(MODALITIES)}")
    if not request.question or not request.question.strip():
        raise ValueError("the question is empty")
    placeholder = "" if modality == "text" else getattr(spec, modality)
    if placeholder is None:
        takes = [m for m in ("image", "video") if getattr(spec, m)]
        raise ValueError(f"{spec.name} takes no {modality} in vLLM (it takes text and {' and '.join(takes)}); "
                         f"send {modality} requests to a base that takes them, or serve with engine 'hf'")
    want = {"image": 3, "video": 4}.get(modality)
    if want is None and request.pixels is not None:
        raise ValueError("a text request carries no pixels")
    if want and (not isinstance(request.pixels, np.ndarray) or request.pixels.ndim != want
                 or request.pixels.shape[-1] != 3):
        shape = "(H, W, 3)" if want == 3 else "(frames, H, W, 3)"
        raise ValueError(f"{modality} pixels must be a uint8 array shaped {shape}, "
                         f"got {getattr(request.pixels, 'shape', None)}")
    if processor_or_template is None or isinstance(processor_or_template, str):
        template = processor_or_template or spec.template
        if placeholder and "{media}" not in template:
            raise ValueError(f"the prompt template has no {{media}} for the {modality}: {template!r}")
        prompt = template.format(media=placeholder, question=request.question)
    else:  # the model's own chat template (renders its own placeholder, as vLLM's processor expects)
        content = ([{"type": modality}] if modality != "text" else []) + [{"type": "text", "text": request.question}]
        prompt = processor_or_template.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                           add_generation_prompt=True)
    if modality == "text":
        return {"prompt": prompt}
    if modality == "image":
        from PIL import Image

        return {"prompt": prompt, "multi_modal_data": {"image": Image.fromarray(request.pixels.astype(np.uint8))}}
    return {"prompt": prompt, "multi_modal_data": {"video": request.pixels.astype(np.uint8, copy=False)}}


def sampling_args(request: GenerateRequest) -> dict:
    """vllm.SamplingParams keywords; temperature 0 is vLLM's greedy (a seed means nothing then)."""
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {request.max_new_tokens}; it must be at least 1")
    if request.temperature < 0:
        raise ValueError(f"temperature is {request.temperature}; use 0 (greedy) or more")
    greedy = request.temperature == 0
    return {"temperature": 0.0 if greedy else float(request.temperature), "max_tokens": int(request.max_new_tokens),
            "stop": list(request.stop), "seed": None if greedy else request.seed}


def lora_args(manifest: Manifest, local_path: Path | str, int_id: int) -> dict:
    """vllm.lora.request.LoRARequest keywords; vLLM caches LoRAs by int id, which must be >= 1."""
    if int_id < 1:
        raise ValueError(f"lora_int_id is {int_id}; vLLM wants 1 or more")
    return {"lora_name": manifest.ref, "lora_int_id": int(int_id), "lora_path": str(local_path)}


class LoraIds:
    """Stable int ids: one per (ref, weights), never reused, so vLLM's own LoRA cache (keyed by id)
    can never answer with other weights, even after an evicted adapter comes back."""

    def __init__(self):
        self._ids: dict[tuple[str, str], int] = {}

    def __call__(self, manifest: Manifest) -> int:
        return self._ids.setdefault((manifest.ref, manifest.weights_sha256), len(self._ids) + 1)


def _key(manifest: Manifest) -> str:
    return f"{manifest.ref}@{manifest.weights_sha256[:12]}"


# -- the engine ----------------------------------------------------------------------------------------
class VLLMEngine(AdapterCache):
    """One vLLM base per engine; adapters downloaded on demand into an LRU of `cache_size`."""

    def __init__(self, store: Store | str, base_model_id: str, cache_size: int = 8, device: str = "cuda",
                 dtype=None, max_lora_rank: int = 64, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None):
        if cache_size < 1:
            raise ValueError(f"cache_size is {cache_size}; it must be at least 1")
        self.store = store if isinstance(store, Store) else Store(store)
        self.base_id = base_model_id
        self.info = base_info(self.store, base_model_id)
        # The checks run cheapest and most decisive first: a base vLLM can't serve is refused on any machine.
        self.arch = base_architecture(self.store, base_model_id)
        self.spec = check_architecture(self.arch, base_model_id)
        try:
            import vllm
        except ImportError as err:
            raise EngineUnavailable(
                f"vLLM is not installed in this environment ({err}); it pins its own torch/transformers, so "
                "install it in a separate environment with pip install 'ddft[vllm]', or use engine 'hf'") from None
        import torch

        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            raise EngineUnavailable(
                f"vLLM needs a CUDA GPU; this machine has none (device={device!r}, "
                f"torch.cuda.is_available()={torch.cuda.is_available()}); use engine 'hf' (CPU or GPU)")
        self.cache_size, self.max_lora_rank = cache_size, max_lora_rank
        started = time.perf_counter()
        kwargs = dict(model=str(local_base_dir(self.store, base_model_id)), enable_lora=True, max_loras=cache_size,
                      max_lora_rank=max_lora_rank, gpu_memory_utilization=gpu_memory_utilization,
                      dtype=dtype or "auto")
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as err:  # e.g. this vLLM has no LoRA for the model, or the GPU is too small
            raise EngineUnavailable(f"vLLM could not start base {base_model_id!r} ({self.arch}): "
                                    f"{type(err).__name__}: {str(err)[:400]}; use engine 'hf'") from err
        self.load_s = time.perf_counter() - started
        self._ids = LoraIds()
        self._dir = tempfile.TemporaryDirectory(prefix="ddft-vllm-")  # adapter files, kept while resident
        self._cache: OrderedDict[str, tuple[Manifest, Path]] = OrderedDict()  # LRU first
        self._resident: tuple[str, ...] = ()
        self._lock = threading.RLock()
        self._stats = dict.fromkeys(STATS, 0)
        log.info("engine vllm: base %s (%s) started in %.1fs", base_model_id, self.arch, self.load_s)

    # -- adapters ------------------------------------------------------------------------------------
    def load_adapter(self, manifest: Manifest, pinned: frozenset[str] = frozenset()) -> str:
        """Download an adapter (or refresh it in the LRU); return its vLLM lora_name (its ref).

        vLLM reads the files itself when a request first uses the adapter, so they stay on disk while
        it is resident; adapters in `pinned` (those of the running batch) are never evicted.
        """
        with self._lock:
            key = _key(manifest)
            if key in self._cache:
                self._stats["adapter_hits"] += 1
                self._cache.move_to_end(key)
                self._resident = tuple(m.ref for m, _ in self._cache.values())
                return manifest.ref
            self._stats["adapter_misses"] += 1
            check_base(manifest, self.base_id, self.info.fingerprint)
            if manifest.modules_to_save:  # vLLM would drop them silently and answer differently from 'hf'
                raise AdapterError(
                    f"adapter {manifest.ref} also trains {manifest.modules_to_save} in full (modules_to_save); "
                    "vLLM applies LoRA to the language model only: serve it with engine 'hf'")
            if manifest.rank > self.max_lora_rank:
                raise AdapterError(f"adapter {manifest.ref} has rank {manifest.rank}, above this engine's "
                                   f"max_lora_rank {self.max_lora_rank}: start the engine with a larger one")
            path = Path(tempfile.mkdtemp(prefix="adapter-", dir=self._dir.name))
            try:
                registry.download(self.store, manifest, path)
            except Exception:
                shutil.rmtree(path, ignore_errors=True)
                raise
            self._cache[key] = (manifest, path)
            self._stats["adapter_loads"] += 1
            self._evict(pinned | {key})
            log.info("engine vllm: adapter %s loaded (%d resident)", manifest.ref, len(self._cache))
            return manifest.ref

    def evict_adapter(self, ref: str) -> bool:
        with self._lock:
            keys = [k for k, (m, _) in self._cache.items() if m.ref == ref]
            for k in keys:
                self._drop(k)
            return bool(keys)

    def _evict(self, keep: frozenset[str]) -> None:
        for key in list(self._cache):
            if len(self._cache) <= self.cache_size:
                break
            if key not in keep:
                self._drop(key)

    def _drop(self, key: str) -> None:
        manifest, path = self._cache.pop(key)
        self._resident = tuple(m.ref for m, _ in self._cache.values())
        self._stats["adapter_evictions"] += 1
        remove = getattr(getattr(self.llm, "llm_engine", None), "remove_lora", None)
        if remove is not None:  # free vLLM's copy too, so memory follows this LRU
            try:
                remove(self._ids(manifest))
            except Exception as err:  # never used by a request yet: vLLM never loaded it
                log.debug("engine vllm: remove_lora(%s): %s", manifest.ref, err)
        shutil.rmtree(path, ignore_errors=True)
        log.info("engine vllm: adapter %s evicted", manifest.ref)

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """One llm.generate for the whole batch: vLLM schedules the mixed adapters itself."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        inputs, params = [], []
        for i, r in enumerate(requests):  # every request is checked before anything loads
            try:
                if r.adapter is not None and r.adapter.modality not in (r.modality, JOINT):
                    raise AdapterError(f"adapter {r.adapter.ref} is for {r.adapter.modality}, "
                                       f"the request is {r.modality}")
                inputs.append(to_prompt(self.arch, r, self.spec.template))
                params.append(SamplingParams(**sampling_args(r)))
            except ValueError as err:  # AdapterError is a ValueError too
                raise type(err)(f"request {i}: {err}") from None
        with self._lock:
            t0 = time.perf_counter()
            pinned = frozenset(_key(r.adapter) for r in requests if r.adapter)
            loras = []
            for r in requests:
                if r.adapter is None:
                    loras.append(None)
                    continue
                self.load_adapter(r.adapter, pinned=pinned)
                path = self._cache[_key(r.adapter)][1]
                loras.append(LoRARequest(**lora_args(r.adapter, path, self._ids(r.adapter))))
            t1 = time.perf_counter()
            try:
                outputs = self.llm.generate(inputs, params, lora_request=loras, use_tqdm=False)
            finally:
                self._evict(frozenset())  # a batch with more adapters than the cache may have overfilled it
            t2 = time.perf_counter()
            return [self._result(r, out, len(requests), len(pinned), t1 - t0, t2 - t1)
                    for r, out in zip(requests, outputs)]

    def _result(self, r: GenerateRequest, out, batch_size: int, adapters: int, load_s: float,
                generate_s: float) -> GenerateResult:
        done = out.outputs[0]  # a vLLM RequestOutput: one completion per request
        n_prompt, n_new = len(out.prompt_token_ids or []), len(done.token_ids)
        for k, n in (("requests", 1), ("prompt_tokens", n_prompt), ("new_tokens", n_new)):
            self._stats[k] += n
        return GenerateResult(
            text=done.text.strip(), adapter=r.adapter.ref if r.adapter else None, base=self.base_id,
            finish_reason="length" if done.finish_reason == "length" else "stop",
            timings={"adapter_load_s": round(load_s, 4), "generate_s": round(generate_s, 4),
                     "batch_size": batch_size, "adapters_in_batch": adapters,
                     "prompt_tokens": n_prompt, "new_tokens": n_new})
