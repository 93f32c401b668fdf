"""Answers for evaluation's requests from the engine named, the way serving gets them: `hf` in this
process, `vllm` in vLLM's own environment (engines/vllm_batch.generate_in: vLLM pins its own torch
and transformers). Greedy, every model's requests in one queue, so adapters share batches."""

from __future__ import annotations

from pathlib import Path

from ddft.engines.base import GenerateRequest
from ddft.store import Store

ENGINES = ("hf", "vllm")
HF_DEFAULTS = {"cache_size": 4}  # without serve settings: the base and a few adapters resident


def generate(
    store: Store,
    base_id: str,
    requests: list[GenerateRequest],
    engine: str = "hf",
    options: dict | None = None,
    python: str | Path | None = None,
    batch: int = 8,
) -> list[str]:
    """The answers' texts, in request order. `options`: the engine's keywords (engines.base.serve_options,
    plus device); `python`: vLLM's interpreter (serve.vllm.python), for engine vllm; `batch`: hf requests
    handed to the engine at once (bounds its queue on a long evaluation)."""
    if engine == "hf":
        from ddft.engines.hf import HFEngine

        hf = HFEngine(store, base_id, **(options or HF_DEFAULTS))
        return [r.text for i in range(0, len(requests), batch) for r in hf.generate(requests[i : i + batch])]
    if engine == "vllm":
        return _vllm(store, base_id, requests, options or {}, python)
    raise ValueError(f"unknown engine {engine!r}: evaluate on one of {list(ENGINES)}")


def _vllm(store: Store, base_id: str, requests: list, options: dict, python: str | Path | None) -> list[str]:
    from ddft.engines.vllm_batch import BatchJob, generate_in

    if python is None:
        raise ValueError("engine vllm needs vLLM's interpreter (serve.vllm.python; `make venv-vllm` builds it)")
    # One subprocess for the whole evaluation: vLLM loads once. The Store itself goes, not its URI, so
    # credentials given in the config (store.access_key_id...) reach the subprocess too.
    out = generate_in(python, BatchJob(store, base_id, requests, options))
    failed = [(i, r) for i, r in enumerate(out.results) if isinstance(r, BaseException)]
    if failed:  # a score over some answers would look like a worse model: none, and say why
        i, err = failed[0]
        raise RuntimeError(
            f"vLLM failed {len(failed)} of {len(requests)} evaluation requests; request {i} "
            f"({requests[i].modality}, {requests[i].adapter.ref if requests[i].adapter else 'base'}): "
            f"{type(err).__name__}: {err}"
        )
    return [r.text for r in out.results]
