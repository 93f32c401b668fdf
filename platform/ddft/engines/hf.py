"""The `hf` engine: one Video-LLaVA base (transformers) with PEFT LoRA adapters loaded on demand.

A batch may mix adapters: every row runs through its own LoRA in one forward, during prefill and
every decode step. The LoRA layers do it in two batched matmuls per layer (batched_lora.py: stacked
adapter weights, BGMV-style); PEFT's `adapter_names=[...]` (one name per row, "__base__" for the
bare base) still drives the projector's copies below.

Loading an adapter: a plain LoRA on the language model (every tenant upload, a text adapter) is hot-loaded,
its safetensors written straight into a free slot of the layers' stacks (`AdapterBank.load`), and
PEFT never hears of it (its rows are "__base__" to PEFT's hook: no projector copy, no other layer);
anything else (a projector trained in full) is loaded by PEFT, then stacked. Both answer the same.

Rows are scheduled per step (scheduler.py): a request joins the running rows at the next step
(its prefill, media included, then decode beside the others whatever their modality, adapter or
sampling) and leaves at its own end of sequence, stop string or max_new_tokens, or when its
stream's consumer goes away. Sampled rows draw from their own seeded generator (within their top_p
nucleus), constrained rows (a grammar or a JSON Schema) take only the tokens their matcher allows,
beside free rows; logprobs are the raw logits' log_softmax, before any of these. The
language model attends row by row (attention.py), so padding beside longer rows changes nothing.
Streams get their tokens through their event loop and turn them into text (detok.py). A bad
request fails alone, before or at its own prefill.

PEFT 0.21 limits this path for `modules_to_save` (our image/video adapters train the projector
fully), so the projector's wrappers are given `_MixedProjector` below: PEFT's own mixed path
accepts only Linear/Embedding/Conv modules (the projector is a small MLP module), wants exactly
one name per input row (a video sends 8 frames per request through the projector), and falls
back to the base projector for everyone when the *active* adapter has no projector copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils.other import ModulesToSaveWrapper

from ddft import prompts
from ddft.adapters.files import WEIGHTS
from ddft.adapters.registry import AdapterError, Manifest, check_base
from ddft.engines.attention import use_row_attention
from ddft.engines.base import Chunk, EngineBase, GenerateRequest, GenerateResult, check_request
from ddft.engines.batched_lora import BASE, AdapterBank, needs_peft, unsupported
from ddft.engines.detok import TextStream
from ddft.engines.grammar import Compiler, Constraint
from ddft.engines.lru import adapter_key
from ddft.engines.scheduler import KVRows, Row, Scheduler
from ddft.models.load import load_base, local_base_dir
from ddft.store import Store, StoreError

log = logging.getLogger(__name__)


class _MixedProjector(ModulesToSaveWrapper):
    """A modules_to_save wrapper whose mixed-batch forward works for any module and for videos.

    With `adapter_names` (set by PEFT's forward hook for the whole batch) the input rows are
    split by adapter, each sub-batch runs through that adapter's copy of the module (or the
    original for "__base__" and for adapters without a copy), and the outputs are put back in
    order. When the input has k rows per request (k video frames), each name is repeated k times.
    Without `adapter_names` it is PEFT's wrapper, unchanged.
    """

    def forward(self, x, *args, adapter_names=None, **kwargs):
        if adapter_names is None:
            return super().forward(x, *args, **kwargs)
        n = len(adapter_names)
        if len(x) != n:
            if n == 0 or len(x) % n:
                raise ValueError(f"{len(x)} input rows can't be split among {n} adapter names")
            adapter_names = [a for a in adapter_names for _ in range(len(x) // n)]
        out = None
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, a in enumerate(adapter_names) if a == name]
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            y = module(x[rows], *args, **kwargs)
            if out is None:
                out = y.new_empty((len(x), *y.shape[1:]))
            out[rows] = y
        return out


class HFEngine(EngineBase):
    """One base per engine; adapters in an LRU cache of `cache_size`; rows of any adapter, modality
    and sampling stepped together (engines/scheduler.py)."""

    def __init__(
        self,
        store: Store | str,
        base_model_id: str,
        cache_size: int = 8,
        device: str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        max_batch_size: int = 8,
        max_cached_tokens: int = 65536,
        max_waiting: int = 256,
        host_cache_mb: float = 512.0,
    ):
        super().__init__(store, base_model_id, cache_size, host_cache_mb)
        self.device = torch.device(device)
        started = time.perf_counter()
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # serve.dtype: "bfloat16", ...
        model, self.processor = load_base(local_base_dir(self.store, base_model_id), dtype=dtype)
        # frozen as PEFT's first inject would freeze it (the LoRA layers may be ours, made before PEFT's)
        self.model = model.to(self.device).eval().requires_grad_(False)
        use_row_attention(self.model)  # a row's tokens don't depend on what shares its steps (attention.py)
        self.load_s = time.perf_counter() - started
        self.tokenizer = tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id
        self.base_name = BASE
        self._peft: PeftModel | None = None  # made by the first adapter PEFT loads
        self._bank = AdapterBank(self.model)  # the LoRA layers' stacked adapters
        self._hot: set[str] = set()  # adapters only in the bank's stacks (hot-loaded: no PEFT module)
        self.batched_lora = True  # False: PEFT's own adapter_names loop (for comparison)
        self.hot_load = True  # False: every adapter through PEFT's load (for comparison)
        self._grammars: Compiler | None = None  # constraints compiled for this tokenizer (made on first use)
        self._scheduler = Scheduler(self, self._lock, max_batch_size, max_cached_tokens, cache_size, max_waiting)
        log.info("engine hf: base %s loaded in %.1fs on %s", base_model_id, self.load_s, self.device)

    # -- adapters ----------------------------------------------------------------------------------
    def load_adapter(self, manifest: Manifest, pinned: frozenset[str] = frozenset()) -> str:
        """Make an adapter resident (or refresh it in the LRU); return its PEFT name. The least
        recently used beyond cache_size go, never those in `pinned` (a batch's names)."""
        with self._lock:
            return self.adapters.acquire(manifest, pinned)

    def _load(self, manifest: Manifest) -> str:
        """Make an adapter resident (the LRU's loader): hot-loaded into the stacks when it is plain
        LoRA on Linear layers, else injected by PEFT and stacked; its name."""
        name = adapter_key(manifest)
        check_base(manifest, self.base_id, self.info.fingerprint)
        with tempfile.TemporaryDirectory(prefix="ddft-adapter-") as tmp:
            path = self.host.download(self.store, manifest, Path(tmp))
            config = PeftConfig.from_pretrained(str(path))
            why = unsupported(config)
            if why:
                raise AdapterError(
                    f"adapter {manifest.ref} can't be served by the hf engine: {why}; "
                    f"re-train or re-publish it as plain LoRA"
                )
            why = "hot loads are off" if not (self.hot_load and self.batched_lora) else needs_peft(config)
            if why is None:
                why = self._bank.load(name, config, safetensors.torch.load((path / WEIGHTS).read_bytes()))
            if why is None:
                self._hot.add(name)
                log.info("engine hf: adapter %s hot-loaded (%d resident before it)", manifest.ref, len(self.adapters))
                return name
            self._peft_load(manifest, name, str(path))
        self._bank.add_peft(name)
        log.info(
            "engine hf: adapter %s loaded by PEFT, %s (%d resident before it)", manifest.ref, why, len(self.adapters)
        )
        return name

    # PEFT's weights are made, and their requires_grad flipped (PEFT makes the active adapter
    # trainable, and puts back what it found after a load), in inference mode only: weights made in a
    # batch's load are inference tensors, which torch won't give requires_grad=True outside it.
    @torch.inference_mode()
    def _peft_load(self, manifest: Manifest, name: str, path: str) -> None:
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
            else:
                if not self._peft.peft_config:  # every PEFT adapter was evicted (hot ones aren't PEFT's): PEFT
                    # re-activates its active ones, and [] is refused; the PeftModel keeps its own name of
                    # the active one too, which its load reads first (a stale one: KeyError)
                    self._peft.base_model.active_adapter = self._peft.active_adapter = name
                self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
        except Exception as err:  # a config or weights that don't fit this base
            if self._peft is not None and name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            raise AdapterError(
                f"adapter {manifest.ref} could not be loaded on base {self.base_id!r}: "
                f"{type(err).__name__}: {str(err)[:300]}"
            ) from err
        self._peft_loaded(name)

    def _peft_loaded(self, name: str) -> None:
        """After PEFT added an adapter: eval mode, an active adapter, our projector and LoRA classes."""
        if self._peft.active_adapter not in self._peft.peft_config:  # all were evicted: PEFT kept a stale one
            self._peft.set_adapter(name)
        self._peft.eval()
        for module in self._peft.modules():
            if type(module) is ModulesToSaveWrapper:
                module.__class__ = _MixedProjector
        self._bank.adopt()

    @torch.inference_mode()
    def _to_peft(self, name: str) -> None:
        """Give a hot-loaded adapter PEFT modules (PEFT's own mixed loop, `batched_lora` off, needs
        them): a LoRA of its stacked weights, A and B·scaling with scaling 1, so the same numbers."""
        weights = self._bank.weights(name)
        ranks = {re.escape(m): a.shape[0] for m, (a, _) in weights.items()}  # exact names as patterns
        config = LoraConfig(
            r=max(ranks.values()),
            lora_alpha=max(ranks.values()),
            target_modules=sorted(weights),
            rank_pattern=ranks,
            alpha_pattern=ranks,
            inference_mode=True,
        )
        if self._peft is None:
            self._peft = PeftModel(self.model, config, adapter_name=name)
        else:
            self._peft.add_adapter(name, config)
        for module, (a, b) in weights.items():
            layer = self._bank.layers[module]
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
        self._peft_loaded(name)
        self._hot.discard(name)

    def _unload(self, manifest: Manifest, name: str) -> None:
        if name in self._hot:
            self._hot.discard(name)
        else:
            with torch.inference_mode():  # PEFT makes another adapter active (see _peft_load)
                self._peft.delete_adapter(name)
        self._bank.remove(name)  # its slot is free for the next one
        log.info("engine hf: adapter %s evicted", manifest.ref)

    # -- requests ------------------------------------------------------------------------------------
    def _compiler(self) -> Compiler:
        if self._grammars is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._grammars = Compiler(self.processor.tokenizer, vocab)
        return self._grammars

    def prepare(self, constraint: Constraint) -> None:
        """Compile a constraint now (the recipe grammar takes seconds on a large vocabulary), so the
        first request that uses it doesn't wait for it."""
        self._compiler()(constraint)

    def _row(self, request: GenerateRequest, loop: asyncio.AbstractEventLoop | None = None) -> Row:
        row = Row(request, self._encode(request), loop, asyncio.Queue() if loop is not None else None)
        if request.temperature > 0:  # its own generator: the same draws whatever shares its steps
            row.generator = torch.Generator(device=self.device)
            seed = request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item())
            row.generator.manual_seed(seed)
        if request.constraint is not None:
            row.matcher = self._compiler().matcher(request.constraint)  # a bad constraint fails here, alone
        return row

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Every request at once (stepped together with whatever else runs), answered in order."""
        for i, r in enumerate(requests):  # every request is checked before anything runs
            check_request(r, i)
        rows = self._scheduler.submit([self._row(r) for r in requests])
        return [row.done.result() for row in rows]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """One request, joining the running rows at the next step; its text arrives as it is
        generated (detok.py), the whole result on the last chunk."""
        check_request(request)  # a bad request fails alone, before it is queued
        (row,) = self._scheduler.submit([self._row(request, asyncio.get_running_loop())])
        text = TextStream(self.processor.tokenizer, request.stop)
        sent = 0  # tokens streamed so far; their logprobs are row.logprobs[:sent] (made before the push)
        try:
            ended = False
            while not ended:
                ids = [await row.queue.get()]
                while not row.queue.empty():  # a slow reader takes what piled up in one chunk
                    ids.append(row.queue.get_nowait())
                ended = ids[-1] is None
                ids = [t for step in ids if step is not None for t in step]
                if ids:
                    logprobs = row.logprobs[sent : sent + len(ids)] if request.logprobs is not None else []
                    sent += len(ids)
                    yield Chunk(text.add(ids), ids, logprobs)
            result = row.done.result()  # the request's own error, if it had one
            yield Chunk(text.finish(result.text), finish_reason=result.finish_reason, result=result)
        finally:  # consumer closed or cancelled: its row leaves at the next step, the others go on
            row.closed = True

    def figures(self) -> dict[str, float]:
        return self._scheduler.figures()

    # -- what the scheduler calls (under the engine's lock, in inference mode) -------------------------
    def admit(self, rows: list[Row], pinned: frozenset[str]) -> list[Row]:
        """Load the rows' adapters, never evicting the running rows' (`pinned`); the rows that can run."""
        started = time.perf_counter()
        needed = pinned | {adapter_key(r.request.adapter) for r in rows if r.request.adapter}
        ok = []
        for row in rows:
            try:
                row.name = self.load_adapter(row.request.adapter, pinned=needed) if row.request.adapter else BASE
            except (ValueError, AdapterError, StoreError) as err:
                row.end(err)
                continue
            row.adapter_load_s = time.perf_counter() - started
            ok.append(row)
        return ok

    def _encode(self, r: GenerateRequest) -> dict:
        frames = len(r.pixels) if r.modality == "video" else 1
        return prompts.encode(self.processor, r.modality, r.question, frames=frames, raw=r.raw, history=r.history)

    def _prepare(self, modality: str, reqs: list[GenerateRequest], encoded: list[dict]) -> dict:
        """Model inputs of one modality's requests (their prompts encoded): left-padded ids and mask,
        pixels, position ids counting each row's own tokens (as model.generate makes them)."""
        batch = prompts.pad_batch(encoded, self.pad_id)
        mask = batch["attention_mask"]
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0),
        }
        if modality != "text":
            inputs.update(prompts.pixel_inputs(self.processor, modality, [r.pixels for r in reqs]))
        dtype = self.model.dtype
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    def prefill(self, modality: str, rows: list[Row]) -> tuple[torch.Tensor, KVRows]:
        inputs = self._prepare(modality, [r.request for r in rows], [r.prompt for r in rows])
        out = self._forward("forward", {**inputs, "use_cache": True, "logits_to_keep": 1}, [r.name for r in rows])
        return out.logits[:, -1].float(), KVRows(out.cache, inputs["attention_mask"])

    def decode(self, last: torch.Tensor, positions: torch.Tensor, kv: KVRows, names: list[str]) -> torch.Tensor:
        inputs = {
            "input_ids": last.to(self.device),
            "attention_mask": kv.grow(),
            "position_ids": positions.to(self.device),
            "cache": kv.cache,
            "use_cache": True,
        }
        return self._forward("forward", inputs, names).logits[:, -1].float()

    def mask(self, logits: torch.Tensor, rows: list[Row]) -> None:
        if any(r.matcher is not None for r in rows):
            self._compiler().mask(logits, [r.matcher for r in rows])

    def finish(self, row: Row, reason: str) -> GenerateResult:
        end = time.perf_counter()
        first = row.first_token or end
        timings = {
            "queue_s": round(row.admitted - row.enqueued, 4) if row.admitted else 0.0,
            "adapter_load_s": round(row.adapter_load_s, 4),
            "first_token_s": round(first - row.enqueued, 4),
            "decode_s": round(end - first, 4),
            "generate_s": round(end - (row.admitted or row.enqueued), 4),
            "batch_size": max(row.peak_rows, 1),
            "adapters_in_batch": row.peak_adapters,
            "engine": "hf",
        }
        return super().finish(row.request, row.tokens, reason, row.prompt_tokens, timings, row.logprobs)

    def _forward(self, method: str, inputs: dict, names: list[str]):
        """model.forward with every row through its adapter: the batched LoRA path, or PEFT's own
        loop when it's off. PEFT's hook drives the projector copies (and PEFT's other layers): a
        hot-loaded adapter has none, so it is the bare base to PEFT."""
        if self.batched_lora:
            context = self._bank.batch(names)
        else:
            for name in dict.fromkeys(names):
                if name in self._hot:
                    self._to_peft(name)
            context = contextlib.nullcontext()
        with context:
            if self._peft is not None and self._peft.peft_config:
                known = self._peft.peft_config
                return getattr(self._peft, method)(**inputs, adapter_names=[n if n in known else BASE for n in names])
            return getattr(self.model, method)(**inputs)

    def forward_logits(self, requests: list[GenerateRequest]) -> torch.Tensor:
        """Next-token logits of the prompts (batch, vocab), one modality per call; for checks."""
        modality = requests[0].modality
        with self._lock, torch.inference_mode():
            needed = frozenset(adapter_key(r.adapter) for r in requests if r.adapter)
            names = [self.load_adapter(r.adapter, pinned=needed) if r.adapter else BASE for r in requests]
            inputs = self._prepare(modality, requests, [self._encode(r) for r in requests])
            return self._forward("forward", inputs, names).logits[:, -1].float().cpu()
