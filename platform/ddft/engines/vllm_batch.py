"""Run a batch of requests through the vllm engine in vLLM's own environment, from anywhere.

vLLM lives in its own venv (its own torch and transformers), so code in the project's venv (the
engine-equality test, the serving benchmark, evaluation on vLLM) hands it requests through a
subprocess of that interpreter: `generate_in(python, ...)` pickles the typed requests, runs this
module there, and reads the typed results back. Importing this module imports nothing heavy.

    <vllm python> -m ddft.engines.vllm_batch JOB.pkl OUT.pkl
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BatchJob:
    store: str  # the store's URI
    base_id: str
    requests: list  # GenerateRequest
    engine: dict = field(default_factory=dict)  # VLLMEngine keywords
    raw: bool = False  # also time the same requests through vLLM's engine directly (benchmark)
    concurrent: bool = True  # False: one request at a time
    arrivals: list[float] | None = None  # streamed, request i sent at arrivals[i] s after the start
    rounds: dict[str, list] | None = None  # benchmark: named request sets, each timed `repeats` times
    repeats: int = 3


@dataclass
class BatchOutput:
    results: list  # GenerateResult (or the exception that request raised), in request order
    load_s: float
    generate_s: float
    raw_generate_s: float | None = None
    raw_token_ids: list | None = None
    first_token_at: list[float] | None = None  # with arrivals: s after the start, per request
    finished_at: list[float] | None = None
    tokens_per_s: dict[str, float] | None = None  # with rounds: the best round's generated tokens/s per set


def generate_in(python: str | Path, job: BatchJob, timeout: float = 1800, env: dict | None = None) -> BatchOutput:
    """Run `job` with the interpreter of vLLM's environment; its typed output (or a RuntimeError
    with the end of the subprocess's log)."""
    if not Path(python).exists():
        raise FileNotFoundError(f"no vLLM environment at {python}: build it with `make venv-vllm`")
    with tempfile.TemporaryDirectory(prefix="ddft-vllm-batch-") as tmp:
        src, out, log = Path(tmp) / "job.pkl", Path(tmp) / "out.pkl", Path(tmp) / "log.txt"
        src.write_bytes(pickle.dumps(job))
        with open(log, "w") as f:
            proc = subprocess.run(
                [str(python), "-m", "ddft.engines.vllm_batch", str(src), str(out)],
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                env={**os.environ, **(env or {})},
            )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the vLLM batch failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        return pickle.loads(out.read_bytes())


def portable(result):
    """A result the caller's interpreter can unpickle: an exception of a class defined by vLLM (or
    anything the caller's venv lacks) becomes a RuntimeError naming that class and its message."""
    if isinstance(result, BaseException) and type(result).__module__.split(".")[0] not in ("builtins", "ddft"):
        return RuntimeError(f"{type(result).__module__}.{type(result).__qualname__}: {result}")
    return result


def run(job: BatchJob) -> BatchOutput:
    import asyncio
    import time

    from ddft.engines.vllm import VLLMEngine

    engine = VLLMEngine(job.store, job.base_id, **job.engine)
    try:
        t = time.perf_counter()
        if job.arrivals is not None:
            return asyncio.run(_arrivals(engine, job))
        if job.concurrent:  # one bad request fails alone: its exception takes its place
            results = asyncio.run(_all(engine, job.requests))
        else:
            results = [engine.generate([r])[0] for r in job.requests]
        output = BatchOutput(results, engine.load_s, time.perf_counter() - t)
        if job.rounds:
            output.tokens_per_s = _rounds(engine, job.rounds, job.repeats)
        if job.raw:  # warm, and the best of `repeats`, as the rounds are
            runs = [asyncio.run(_raw(engine, job.requests)) for _ in range(max(1, job.repeats))]
            output.raw_generate_s, output.raw_token_ids = min(runs, key=lambda run: run[0])
        return output
    finally:
        engine.close()


def _rounds(engine, rounds: dict[str, list], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` generated tokens/s of each named set (the sets interleaved, so a noisy
    moment on a shared machine hits one round, not one set)."""
    import time

    best = dict.fromkeys(rounds, 0.0)
    for _ in range(repeats):
        for name, requests in rounds.items():
            t = time.perf_counter()
            results = engine.generate(requests)
            best[name] = max(best[name], sum(len(r.token_ids) for r in results) / (time.perf_counter() - t))
    return best


async def _all(engine, requests) -> list:
    import asyncio

    return await asyncio.gather(*(engine.answer(r) for r in requests), return_exceptions=True)


async def _arrivals(engine, job: BatchJob) -> BatchOutput:
    """Each request streamed from its arrival time on, so later ones meet earlier ones mid-generation."""
    import asyncio
    import time

    start = time.perf_counter()
    first, done, results = [None] * len(job.requests), [None] * len(job.requests), [None] * len(job.requests)

    async def one(i, r):
        await asyncio.sleep(job.arrivals[i])
        async for chunk in engine.stream(r):
            if first[i] is None and chunk.token_ids:
                first[i] = time.perf_counter() - start
            if chunk.result is not None:
                results[i], done[i] = chunk.result, time.perf_counter() - start

    await asyncio.gather(*(one(i, r) for i, r in enumerate(job.requests)))
    return BatchOutput(results, engine.load_s, time.perf_counter() - start, first_token_at=first, finished_at=done)


async def _raw(engine, requests) -> tuple[float, list]:
    """The same requests straight into vLLM's AsyncLLM (no ddft stream, no adapters): the floor
    that `vllm_served_vs_raw` compares the served path against."""
    import asyncio
    import time

    from vllm import SamplingParams

    from ddft.engines.vllm import engine_input, sampling_args

    async def one(i, r):
        ids = []
        async for out in engine.llm.generate(
            engine_input(engine.tokenizer, r, 0), SamplingParams(**sampling_args(r)), f"raw-{i}"
        ):
            ids = list(out.outputs[0].token_ids)
        return ids

    async def all_of():
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    t = time.perf_counter()
    ids = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(all_of(), engine._loop))
    return time.perf_counter() - t, ids


if __name__ == "__main__":  # vLLM spawns its engine core: the work must not run on import
    from ddft.engines import vllm_batch  # the module's own classes, so the caller can unpickle them

    job = pickle.loads(Path(sys.argv[1]).read_bytes())
    output = vllm_batch.run(job)
    output.results = [vllm_batch.portable(r) for r in output.results]
    Path(sys.argv[2]).write_bytes(pickle.dumps(output))
