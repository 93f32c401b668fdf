"""The `hf` engine: one Video-LLaVA base (transformers) with PEFT LoRA adapters loaded on demand.

A batch may mix adapters: every row runs through its own LoRA in one forward, during prefill and
every decode step. The LoRA layers do it in two batched matmuls per layer (batched_lora.py: stacked
adapter weights, BGMV-style); PEFT's `adapter_names=[...]` (one name per row, "__base__" for the
bare base) still drives the projector's copies below.

Loading an adapter: a plain LoRA on the language model (every tenant upload, a text adapter) is hot-loaded,
its safetensors written straight into a free slot of the layers' stacks (`AdapterBank.load`), and
PEFT never hears of it (its rows are "__base__" to PEFT's hook: no projector copy, no other layer);
anything else (a projector trained in full) is loaded by PEFT, then stacked. Both answer the same.

Requests are grouped by modality (their pixel inputs differ) and sampling temperature. Each row
ends at its own end of sequence, stop string or max_new_tokens; sampled rows draw from their own
seeded generator, whatever else is in the batch. A row with a constraint (a grammar or a JSON
Schema) takes only the tokens it allows (grammar.ConstrainedRows), beside free rows in the batch.

Streams (`stream`) wait in a Batcher (batcher.py) that forms the next batch when the engine is
free; the batch runs in a worker thread, and the per-row stopping criterion, which sees every
step's tokens, hands each row its new token through the event loop to that row's consumer, which
turns tokens into text (detok.py). A bad request in a batch is answered alone, so it fails only
itself; a consumer that goes away ends its row at the next step.

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
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils.other import ModulesToSaveWrapper
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ddft import prompts
from ddft.adapters.files import WEIGHTS
from ddft.adapters.registry import AdapterError, Manifest, check_base
from ddft.engines.base import ENGINE_STATS, AdapterCache, Chunk, GenerateRequest, GenerateResult, check_request
from ddft.engines.batched_lora import BASE, AdapterBank, needs_peft, unsupported
from ddft.engines.batcher import Batcher
from ddft.engines.detok import TextStream, first_stop
from ddft.engines.grammar import Compiler, ConstrainedRows, Constraint
from ddft.engines.host_tier import HostTier
from ddft.engines.lru import AdapterLRU, adapter_key
from ddft.models.load import base_info, load_base, local_base_dir
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


class _Sink:
    """Where one streamed row's new token ids go: its consumer's asyncio queue, from the worker
    thread (call_soon_threadsafe). `closed` (the consumer went away) ends the row at the next step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.enqueued = time.perf_counter()
        self.sent = self.closed = False

    def push(self, token_ids: list[int]) -> None:
        self.sent = True
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token_ids)


class _RowEnds(StoppingCriteria):
    """Ends each row on its own: at end of sequence, its first stop string, or its max_new_tokens.

    `ended[i]` keeps (new tokens, finish_reason) of row i; transformers pads rows once they end.
    It sees every step's tokens, so it also hands each streamed row its new token to its sink.
    """

    def __init__(
        self, width: int, reqs: list[GenerateRequest], eos_id: int, tokenizer, sinks: list[_Sink | None] | None = None
    ):
        self.width, self.eos_id, self.tokenizer = width, eos_id, tokenizer
        self.limits = [r.max_new_tokens for r in reqs]
        self.stops = [r.stop for r in reqs]
        self.sinks = sinks or [None] * len(reqs)
        self.ended: list[tuple[int, str] | None] = [None] * len(reqs)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[1] - self.width
        last = input_ids[:, -1].tolist()
        for i, end in enumerate(self.ended):
            if end is not None:
                continue
            sink = self.sinks[i]
            if sink is not None and last[i] != self.eos_id:
                if sink.closed:  # nobody reads this row any more: stop spending steps on it
                    self.ended[i] = (n, "cancelled")
                    continue
                sink.push([last[i]])
            if last[i] == self.eos_id:
                self.ended[i] = (n, "stop")
            elif (
                self.stops[i]
                and first_stop(
                    self.tokenizer.decode(input_ids[i, self.width :], skip_special_tokens=True), self.stops[i]
                )
                is not None
            ):
                self.ended[i] = (n, "stop")
            elif n >= self.limits[i]:
                self.ended[i] = (n, "length")
        return torch.tensor([e is not None for e in self.ended], device=input_ids.device)


class _RowSampling(LogitsProcessor):
    """Temperature sampling with one generator per row, so a seeded request draws the same tokens
    whatever else shares its batch: Gumbel-max (argmax of logits/T + Gumbel noise is a sample of
    softmax(logits/T)) under greedy decoding. Rows without a seed draw from the global RNG."""

    def __init__(self, temperature: float, seeds: list[int | None], device: torch.device):
        self.temperature = temperature
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self.generators.append(g)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        expo = torch.stack([torch.empty_like(scores[0]).exponential_(generator=g) for g in self.generators])
        return scores / self.temperature - expo.clamp_min_(1e-30).log()  # -log(Exp(1)) is Gumbel noise


class HFEngine(AdapterCache):
    """One base per engine; adapters in an LRU cache of `cache_size`; mixed-adapter batches."""

    def __init__(
        self,
        store: Store | str,
        base_model_id: str,
        cache_size: int = 8,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.01,
        host_cache_mb: float = 512.0,
    ):
        self.adapters = AdapterLRU(cache_size, self._load, self._unload)
        self.host = HostTier(host_cache_mb)
        self.store = store if isinstance(store, Store) else Store(store)
        self.info = base_info(self.store, base_model_id)
        self.base_id = base_model_id
        self.device = torch.device(device)
        started = time.perf_counter()
        model, self.processor = load_base(local_base_dir(self.store, base_model_id), dtype=dtype)
        # frozen as PEFT's first inject would freeze it (the LoRA layers may be ours, made before PEFT's)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.load_s = time.perf_counter() - started
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id
        self._peft: PeftModel | None = None  # made by the first adapter PEFT loads
        self._bank = AdapterBank(self.model)  # the LoRA layers' stacked adapters
        self._hot: set[str] = set()  # adapters only in the bank's stacks (hot-loaded: no PEFT module)
        self.batched_lora = True  # False: PEFT's own adapter_names loop (for comparison)
        self.hot_load = True  # False: every adapter through PEFT's load (for comparison)
        self._stats = dict.fromkeys(ENGINE_STATS, 0)
        self._lock = threading.RLock()  # one batch or adapter load at a time
        self._batcher = Batcher(self._run_batch, max_batch_size, batch_wait_s)  # concurrent streams
        self._grammars: Compiler | None = None  # constraints compiled for this tokenizer (made on first use)
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

    # -- generation --------------------------------------------------------------------------------
    def _compiler(self) -> Compiler:
        if self._grammars is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._grammars = Compiler(self.processor.tokenizer, vocab)
        return self._grammars

    def prepare(self, constraint: Constraint) -> None:
        """Compile a constraint now (the recipe grammar takes seconds on a large vocabulary), so the
        first request that uses it doesn't wait for it."""
        self._compiler()(constraint)

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        for i, r in enumerate(requests):
            check_request(r, i)
        results: list[GenerateResult | None] = [None] * len(requests)
        with self._lock:
            for modality, temperature, idxs in self._plan(requests):
                for i, res in zip(idxs, self._run(modality, temperature, [requests[i] for i in idxs])):
                    results[i] = res
        return results  # type: ignore[return-value]

    def _plan(self, requests: list[GenerateRequest]):
        """(modality, temperature, request indices) per forward: requests are grouped by modality
        (their pixel inputs differ) and temperature, and split to fit the adapter cache."""
        groups: dict[tuple[str, float], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.modality, float(r.temperature)), []).append(i)
        for (modality, temperature), idxs in groups.items():
            for chunk in self._chunks(idxs, requests):
                yield modality, temperature, chunk

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """One request, batched with the streams waiting when the engine is next free; its text
        arrives as it is generated (detok.py), the whole result on the last chunk."""
        check_request(request)  # a bad request fails alone, before it joins a batch
        sink = _Sink(asyncio.get_running_loop())
        done = asyncio.ensure_future(self._batcher((request, sink)))
        # after the batch's last token (pushed earlier through the same loop) comes this end mark
        done.add_done_callback(lambda _: sink.queue.put_nowait(None))
        text = TextStream(self.processor.tokenizer, request.stop)
        try:
            ended = False
            while not ended:
                ids = [await sink.queue.get()]
                while not sink.queue.empty():  # a slow reader takes what piled up in one chunk
                    ids.append(sink.queue.get_nowait())
                ended = ids[-1] is None
                ids = [t for step in ids if step is not None for t in step]
                if ids:
                    yield Chunk(text.add(ids), ids)
            result = done.result()  # the request's own error, if it had one
            yield Chunk(text.finish(result.text), [], result.finish_reason, result)
        finally:  # consumer closed or cancelled: its row stops at the next step, the batch goes on
            sink.closed = True
            done.cancel()

    async def _run_batch(self, items: list[tuple[GenerateRequest, _Sink]]) -> list[GenerateResult | Exception]:
        """The batcher's runner: every forward of the batch in a worker thread, in turn."""
        results: list = [None] * len(items)
        for modality, temperature, idxs in self._plan([r for r, _ in items]):
            for i, res in zip(idxs, await self._run_rows(modality, temperature, [items[i] for i in idxs])):
                results[i] = res
        return results

    async def _run_rows(self, modality: str, temperature: float, items: list) -> list[GenerateResult | Exception]:
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self._run_locked, modality, temperature, items)
        except (ValueError, AdapterError, StoreError) as err:  # a request's adapter or inputs
            if len(items) == 1 or any(sink.sent for _, sink in items):
                return [err] * len(items)
            # one bad request must not fail its batch-mates: answer each alone (nothing was sent yet)
            return [res for item in items for res in await self._run_rows(modality, temperature, [item])]
        for res, (_, sink) in zip(results, items):
            res.timings["queue_s"] = round(started - sink.enqueued, 4)
        return results

    def _run_locked(self, modality: str, temperature: float, items: list) -> list[GenerateResult]:
        with self._lock:
            return self._run(modality, temperature, [r for r, _ in items], [s for _, s in items])

    def _chunks(self, idxs: list[int], requests: list[GenerateRequest]):
        """Split a group so no chunk needs more distinct adapters than the cache holds."""
        chunk, names = [], set()
        for i in idxs:
            a = requests[i].adapter
            name = adapter_key(a) if a else None
            if name and name not in names and len(names) == self.adapters.size:
                yield chunk
                chunk, names = [], set()
            chunk.append(i)
            if name:
                names.add(name)
        if chunk:
            yield chunk

    def _prepare(self, modality: str, reqs: list[GenerateRequest]) -> tuple[dict, list[str]]:
        """Model inputs (left-padded, pixels included) and the per-row PEFT adapter names."""
        needed = frozenset(adapter_key(r.adapter) for r in reqs if r.adapter)
        names = [self.load_adapter(r.adapter, pinned=needed) if r.adapter else BASE for r in reqs]
        rows = [
            prompts.encode(
                self.processor, modality, r.question, frames=len(r.pixels) if modality == "video" else 1, raw=r.raw
            )
            for r in reqs
        ]
        batch = prompts.pad_batch(rows, self.pad_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if modality != "text":
            inputs.update(prompts.pixel_inputs(self.processor, modality, [r.pixels for r in reqs]))
        dtype = self.model.dtype
        inputs = {k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        return inputs, names

    def _forward(self, method: str, inputs: dict, names: list[str]):
        """model.forward or .generate with every row through its adapter: the batched LoRA path, or
        PEFT's own loop when it's off. PEFT's hook drives the projector copies (and PEFT's other
        layers): a hot-loaded adapter has none, so it is the bare base to PEFT."""
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
            inputs, names = self._prepare(modality, requests)
            return self._forward("forward", inputs, names).logits[:, -1].float().cpu()

    def _run(
        self, modality: str, temperature: float, reqs: list[GenerateRequest], sinks: list[_Sink] | None = None
    ) -> list[GenerateResult]:
        t0 = time.perf_counter()
        inputs, names = self._prepare(modality, reqs)
        t1 = time.perf_counter()
        width = inputs["input_ids"].shape[1]
        tok = self.processor.tokenizer
        ends = _RowEnds(width, reqs, self.eos_id, tok, sinks)
        sampling = [_RowSampling(temperature, [r.seed for r in reqs], self.device)] if temperature > 0 else []
        if any(r.constraint is not None for r in reqs):  # before sampling: a masked token stays impossible
            sampling.insert(0, ConstrainedRows(self._compiler(), [r.constraint for r in reqs]))
        kwargs = dict(
            inputs,
            max_new_tokens=max(r.max_new_tokens for r in reqs),
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            do_sample=False,
            logits_processor=LogitsProcessorList(sampling),
            stopping_criteria=StoppingCriteriaList([ends]),
        )
        with torch.inference_mode():
            out = self._forward("generate", kwargs, names)
        t2 = time.perf_counter()
        results = []
        prompt_tokens = inputs["attention_mask"].sum(1).tolist()
        for i, (r, n_prompt) in enumerate(zip(reqs, prompt_tokens)):
            n, reason = ends.ended[i] or (out.shape[1] - width, "length")
            row = out[i, width : width + n].tolist()
            if reason == "stop" and row and row[-1] == self.eos_id:
                row = row[:-1]
            text = tok.decode(row, skip_special_tokens=True)
            cut = first_stop(text, r.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
            self._stats["new_tokens"] += n
            results.append(
                GenerateResult(
                    text=text.strip(),
                    adapter=r.adapter.ref if r.adapter else None,
                    base=self.base_id,
                    finish_reason=reason,
                    timings={
                        "adapter_load_s": round(t1 - t0, 4),
                        "generate_s": round(t2 - t1, 4),
                        "batch_size": len(reqs),
                        "adapters_in_batch": len(set(names) - {BASE}),
                        "prompt_tokens": int(n_prompt),
                        "new_tokens": n,
                    },
                    token_ids=row,
                )
            )
        self._stats["requests"] += len(reqs)
        self._stats["prompt_tokens"] += int(sum(prompt_tokens))
        return results
