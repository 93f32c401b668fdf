"""Iteration-level (continuous) batching for the hf engine: rows join and leave at every step.

One scheduler thread owns the running rows and one KV cache with a row per running request. Each
step it
1. drops waiting requests whose caller went away, and retires running rows whose stream was closed;
2. admits waiting requests while the bounds allow (running rows, cached tokens, distinct adapters
   the cache can hold at once): their prefill runs (media included, grouped by modality since pixel
   inputs differ), their first token is chosen, and their KV rows join the running cache;
3. decodes one token for every running row in one forward, each row through its own adapter (the
   batched LoRA), with its own sampling (temperature, top_p and seed), grammar mask, stop strings,
   max_new_tokens and logprobs, whatever its modality (after prefill a row is only tokens);
4. retires the rows that ended, at once: their KV rows leave the cache.

Rows have different lengths: the cache is left-padded to the widest row, the attention mask hides
the padding and each row's position ids count only its own tokens, so a row's numbers are the ones
it would get alone (the same padding rules as model.generate's batches). Columns every row masks
are trimmed when the row that needed them leaves.

transformers' own continuous batching (generation/continuous_batching in 5.24) was read first: a
paged cache with packed (ragged) tokens and a scheduler of its own, but one model for every row, no
per-row adapter and no pixel inputs; its attention needs the paged kernels, which our batched LoRA
and projector copies would have to be ported into. So we keep model.forward and the DynamicCache,
and take its shape: a waiting queue, admission under a token budget, prefill then decode.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ddft.engines.base import EngineBusy, token_logprob
from ddft.engines.detok import first_stop

if TYPE_CHECKING:
    from ddft.engines.base import GenerateRequest, GenerateResult, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One request from arrival to its result."""

    request: GenerateRequest
    prompt: dict  # prompts.encode of it, once (media placeholders expanded): read at admission and prefill
    loop: asyncio.AbstractEventLoop | None = None  # a stream's: new tokens go to `queue` through it
    queue: asyncio.Queue | None = None
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    closed: bool = False  # the stream's consumer went away: the row ends at the next step
    enqueued: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token: float = 0.0
    adapter_load_s: float = 0.0
    name: str = ""  # its adapter's name in the engine ("" until admitted)
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token (request.logprobs set)
    generator: torch.Generator | None = None  # a sampled row's own
    matcher: object | None = None  # a constrained row's grammar matcher (xgrammar)
    peak_rows: int = 0  # the most rows that shared a step with it, itself included
    peak_adapters: int = 0

    def push(self, token_ids: list[int] | None) -> None:
        """New tokens to a stream's consumer; None marks the end (its result is on `done` by then)."""
        if self.queue is not None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token_ids)

    def end(self, outcome: GenerateResult | BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(outcome) if isinstance(outcome, BaseException) else self.done.set_result(outcome)
        self.push(None)


class Model(Protocol):
    """What the scheduler needs of an engine (hf.HFEngine)."""

    eos_id: int
    tokenizer: object
    base_name: str  # the name rows without an adapter have

    def admit(self, rows: list[Row], pinned: frozenset[str]) -> list[Row]:
        """Load the rows' adapters (setting row.name), never evicting `pinned`; the rows that can run
        (the others ended with their error)."""

    def prefill(self, modality: str, rows: list[Row]) -> tuple[torch.Tensor, KVRows]:
        """The rows' prompts through the model: last-position logits (rows, vocab) and their KV rows."""

    def decode(self, last: torch.Tensor, positions: torch.Tensor, kv: KVRows, names: list[str]) -> torch.Tensor:
        """One token per row (last, positions: (rows, 1)) through the model; logits (rows, vocab); kv grows."""

    def mask(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """Constrained rows' grammar masks, in place."""

    def finish(self, row: Row, reason: str) -> GenerateResult:
        """The row's result (text, counts, timings)."""


class KVRows:
    """The running rows' KV cache (a transformers DynamicCache, rows on dim 0) and attention mask
    (rows, width): rows are left-padded to the widest."""

    def __init__(self, cache, mask: torch.Tensor):
        self.cache, self.mask = cache, mask

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def __len__(self) -> int:
        return self.mask.shape[0]

    def _layers(self):
        return self.cache.layers

    def _pad(self, width: int) -> None:
        extra = width - self.width
        if extra <= 0:
            return
        for layer in self._layers():
            k, v = layer.keys, layer.values
            layer.keys = torch.cat([k.new_zeros((*k.shape[:2], extra, k.shape[3])), k], dim=2)
            layer.values = torch.cat([v.new_zeros((*v.shape[:2], extra, v.shape[3])), v], dim=2)
        self.mask = torch.cat([self.mask.new_zeros((len(self), extra)), self.mask], dim=1)

    def extend(self, other: KVRows) -> None:
        """Append another batch's rows (padding whichever is narrower on the left)."""
        width = max(self.width, other.width)
        self._pad(width)
        other._pad(width)
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, other.mask])

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay; columns no remaining row attends to are trimmed."""
        idx = torch.tensor(rows, device=self.mask.device)
        self.mask = self.mask[idx]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.width
        self.mask = self.mask[:, start:]
        for layer in self._layers():
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]

    def grow(self) -> torch.Tensor:
        """The mask for a step that appends one token to every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        return self.mask


class Scheduler:
    """The running rows of one engine and the thread that steps them (see the module's docstring).

    Bounds: `max_rows` running at once; `max_cached_tokens` the cache may reach (rows x (width +
    their longest remaining generation), checked when a row is admitted, so a running batch never
    outgrows it); `max_adapters` distinct adapters among running rows (the engine's cache size:
    they must all be resident); `max_waiting` queued beyond those (more: EngineBusy).
    """

    def __init__(
        self,
        model: Model,
        lock: threading.RLock,
        max_rows: int,
        max_cached_tokens: int,
        max_adapters: int,
        max_waiting: int,
    ):
        self.model, self.lock = model, lock
        self.max_rows, self.max_cached_tokens = max_rows, max_cached_tokens
        self.max_adapters, self.max_waiting = max_adapters, max_waiting
        self.waiting: collections.deque[Row] = collections.deque()
        self.running: list[Row] = []
        self.kv: KVRows | None = None
        self.last: torch.Tensor | None = None  # (rows, 1): each running row's newest token
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    # -- what the engine calls ------------------------------------------------------------------------
    def submit(self, rows: list[Row]) -> list[Row]:
        """Queue rows together, so a step admits them together when they fit (one call's batch is
        not split by the scheduler waking between them); EngineBusy, queuing none, when the waiting
        queue is already full."""
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise EngineBusy(
                    f"{len(self.waiting)} requests are already waiting for this replica's engine "
                    f"(its bound, {self.max_waiting}); retry after the Retry-After seconds"
                )
            self.waiting.extend(rows)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="ddft-hf-scheduler", daemon=True)
                self._thread.start()
            self._wake.notify()
        return rows

    def figures(self) -> dict[str, float]:
        """Gauges for /metrics, read without the lock (a snapshot may be one step old)."""
        kv = self.kv
        used = int(kv.mask.numel()) if kv is not None else 0
        return {
            "running_rows": len(self.running),
            "waiting_rows": len(self.waiting),
            "cache_tokens": used,
            "cache_usage": round(used / self.max_cached_tokens, 4),
        }

    # -- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.waiting and not self.running:
                    self._wake.wait()
            try:
                with self.lock, torch.inference_mode():
                    self._retire([i for i, r in enumerate(self.running) if r.closed], "cancelled")
                    self._admit()
                    if self.running:
                        self._step()
            except Exception as err:  # a bug, not a request's fault: every running row gets it, the loop goes on
                log.exception("hf scheduler step failed; failing its %d running rows", len(self.running))
                for row in self.running:
                    row.end(err)
                self.running, self.kv, self.last = [], None, None

    def _take(self) -> list[Row]:
        """Waiting rows that fit now, in arrival order (a row whose adapter would exceed the
        distinct-adapter bound waits, and rows behind it may pass)."""
        taken: list[Row] = []
        adapters = {r.request.adapter.ref for r in self.running if r.request.adapter}
        rows, width, longest = len(self.running), self.kv.width if self.kv is not None else 0, self._longest_left()
        with self._wake:
            for row in list(self.waiting):
                if row.closed or row.done.done():
                    self.waiting.remove(row)
                    row.end(asyncio.CancelledError())
                    continue
                if rows >= self.max_rows:
                    break
                r = row.request
                ref = r.adapter.ref if r.adapter else None
                if ref and ref not in adapters and len(adapters) >= self.max_adapters:
                    continue
                w = len(row.prompt["input_ids"])
                need_w, need_long = max(width, w), max(longest, r.max_new_tokens)
                if (rows + 1) * (need_w + need_long) > self.max_cached_tokens:
                    if rows == 0:  # it can't fit even alone
                        self.waiting.remove(row)
                        row.end(
                            ValueError(
                                f"the prompt ({w} tokens) and max_new_tokens ({r.max_new_tokens}) exceed this engine's "
                                f"cache of {self.max_cached_tokens} tokens: ask for fewer tokens or raise "
                                "serve.max_cached_tokens"
                            )
                        )
                        continue
                    break
                self.waiting.remove(row)
                taken.append(row)
                rows, width, longest = rows + 1, need_w, need_long
                if ref:
                    adapters.add(ref)
        return taken

    def _longest_left(self) -> int:
        return max((r.request.max_new_tokens - len(r.tokens) for r in self.running), default=0)

    def _admit(self) -> None:
        taken = self._take()
        if not taken:
            return
        now = time.perf_counter()
        for row in taken:
            row.admitted = now
        pinned = frozenset(r.name for r in self.running)
        rows = self.model.admit(taken, pinned)
        by_modality: dict[str, list[Row]] = {}
        for row in rows:
            by_modality.setdefault(row.request.modality, []).append(row)
        for modality, group in by_modality.items():
            self._prefill(modality, group)

    def _prefill(self, modality: str, group: list[Row]) -> None:
        from ddft.adapters.registry import AdapterError
        from ddft.store import StoreError

        try:
            logits, kv = self.model.prefill(modality, group)
        except (ValueError, AdapterError, StoreError) as err:  # a request's inputs or adapter
            if len(group) == 1:
                group[0].end(err)
            else:  # one bad request must not fail the others: each alone
                for row in group:
                    self._prefill(modality, [row])
            return
        for row, n in zip(group, kv.mask.sum(1).tolist()):
            row.prompt_tokens = int(n)
        chosen, ended = self._choose(group, logits)
        keep = [i for i in range(len(group)) if i not in ended]
        for i, reason in ended.items():
            self._end(group[i], reason)
        if not keep:
            return
        kv.keep(keep)
        staying = [group[i] for i in keep]
        last = chosen[keep].view(-1, 1)
        if self.kv is None:
            self.kv, self.last = kv, last
        else:
            self.kv.extend(kv)
            self.last = torch.cat([self.last, last])
        self.running += staying

    def _step(self) -> None:
        rows = self.running
        names = [r.name for r in rows]
        distinct = len(set(names) - {self.model.base_name})
        for r in rows:
            r.peak_rows, r.peak_adapters = max(r.peak_rows, len(rows)), max(r.peak_adapters, distinct)
        positions = torch.tensor([[r.prompt_tokens + len(r.tokens) - 1] for r in rows])  # of each row's newest
        logits = self.model.decode(self.last, positions, self.kv, names)
        chosen, ended = self._choose(rows, logits)
        self.last = chosen.view(-1, 1)
        self._retire(sorted(ended), ended)

    def _retire(self, idxs: list[int], reasons: dict[int, str] | str) -> None:
        if not idxs:
            return
        for i in idxs:
            self._end(self.running[i], reasons if isinstance(reasons, str) else reasons[i])
        keep = [i for i in range(len(self.running)) if i not in set(idxs)]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.kv, self.last = None, None
            return
        self.kv.keep(keep)
        self.last = self.last[keep]

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        """Each row's next token from its logits (grammar mask, then greedy or its own sample);
        pushed to its stream. The tokens (rows,) and the rows that ended now -> why."""
        # logprobs are the model's own distribution (vLLM's raw_logprobs): taken before the grammar
        # mask (in place), temperature and top_p; a copy (fancy indexing), fp32 as the logits are
        want = [i for i, r in enumerate(rows) if r.request.logprobs is not None]
        raw = dict(zip(want, logits[want].log_softmax(-1))) if want else {}
        self.model.mask(logits, rows)
        chosen = logits.argmax(-1)
        for i, r in enumerate(rows):
            if r.generator is not None:
                chosen[i] = sample(logits[i], r.request.temperature, r.request.top_p, r.generator)
        now = time.perf_counter()
        ended: dict[int, str] = {}
        tok = self.model.tokenizer
        for i, (r, t) in enumerate(zip(rows, chosen.tolist())):
            r.first_token = r.first_token or now
            if r.matcher is not None and (not r.matcher.accept_token(t) or r.matcher.is_terminated()):
                r.matcher = None  # ended (its end of sequence)
            if t == self.model.eos_id:
                ended[i] = "stop"
                continue
            r.tokens.append(t)
            if i in raw:  # before the push: a stream reads a token's logprob when the token arrives
                r.logprobs.append(self._logprob(raw[i], t, r.request.logprobs))
            r.push([t])
            if (
                r.request.stop
                and first_stop(tok.decode(r.tokens, skip_special_tokens=True), r.request.stop) is not None
            ):
                ended[i] = "stop"
            elif len(r.tokens) >= r.request.max_new_tokens:
                ended[i] = "length"
        return chosen, ended

    def _logprob(self, raw: torch.Tensor, token: int, k: int) -> TokenLogprob:
        top = raw.topk(k) if k else None  # sorted, most likely first
        alternatives = zip(top.indices.tolist(), top.values.tolist()) if k else ()
        return token_logprob(self.model.tokenizer, token, raw[token].item(), alternatives)

    def _end(self, row: Row, reason: str) -> None:
        try:
            row.end(self.model.finish(row, reason))
        except Exception as err:  # finishing is ours; its failure is the row's alone
            row.end(err)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token of a sampled row (logits (vocab,), fp32), by Gumbel-max: argmax(logits/T + Gumbel)
    samples softmax(logits/T). With top_p < 1 only from the nucleus: the likeliest tokens whose mass
    first reaches top_p (the likeliest always kept), as vLLM cuts it. The noise is drawn for the
    whole vocabulary from the row's own generator, so a seed gives the same draws whatever top_p is
    and whatever shares the step."""
    scaled = logits / temperature
    if top_p < 1:
        probs, order = scaled.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs  # the mass of the tokens likelier than each
        scaled[order[before >= top_p]] = -float("inf")
    expo = torch.empty_like(scaled).exponential_(generator=generator)
    return (scaled - expo.clamp_min_(1e-30).log()).argmax()
