"""Run many DDFT jobs at once on one Ray cluster.

Each job's driver is a zero-CPU Ray task that calls TorchTrainer.fit(), so the jobs run side
by side and Ray's scheduler queues the workers that don't fit yet instead of deadlocking.
One job failing does not stop the others. Every job's outcome (a JobResult) is written to the
store, `runs/_results/<job>.json`: scripts and the demo read results there, never from stdout.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ddft import plan
from ddft.config import TrainConfig
from ddft.errors import NotFound
from ddft.store import Store
from ddft.train.job import JobResult, run_job

log = logging.getLogger(__name__)

RESULTS = "runs/_results"  # no run is named so: job names start with a letter or digit


def result_key(job: str) -> str:
    return f"{RESULTS}/{job}.json"


def read_results(store: Store, jobs: list[str], since: float = 0.0) -> dict[str, JobResult]:
    """The last outcome of each named job that ended after `since` (a job with none is left out)."""
    out = {}
    for name in jobs:
        if store.exists(result_key(name)):
            r = JobResult(**store.read_json(result_key(name)))
            if r.ended >= since:
                out[name] = r
    return out


def _drive(cfg: TrainConfig, name: str, force: bool) -> JobResult:
    started = time.time()
    try:
        result = run_job(cfg, cfg.job(name), force=force)
    except Exception as err:  # reported in the table and the store; the other jobs go on
        error = f"{type(err).__name__}: {err}"[:2000]
        result = JobResult(name, cfg.job(name).modality, "failed", started, time.time(), error=error)
    Store.from_config(cfg.store).write_json(result_key(name), dataclasses.asdict(result))
    return result


def run_all(cfg: TrainConfig, only: list[str] | None = None, force: bool = False) -> list[JobResult]:
    """Every job (or those named in `only`) at once; a job already published from the same
    settings and data is skipped unless `force`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = [j.name for j in cfg.jobs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"--only names unknown jobs {unknown}; jobs in the config: {names}")
    chosen = [n for n in names if not only or n in only]
    try:  # a job that can't fit never starts
        plan.check(cfg, Store.from_config(cfg.store), serve=False, jobs=chosen)
    except NotFound as err:  # no base in the store yet, nor a known shape: the jobs say what to run
        log.warning("no memory plan: %s", err.detail)
    # Each job's driver (and the Ray Train controller, which Ray Train puts beside it) runs on this
    # node, the one `ray job submit` runs the entrypoint on: losing any other node loses only
    # workers, which Ray Train restarts from the last checkpoint.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    drive = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(_drive)
    refs = [drive.remote(cfg, n, force) for n in chosen]
    return ray.get(refs)


def table(results: list[JobResult]) -> str:
    rows = [("job", "status", "steps", "first loss", "last loss", "val loss", "tokens/s", "seconds", "adapter")]
    loss = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
    for r in results:
        rows.append(
            (
                r.name,
                r.status + (f" (resumed at {r.resumed_from})" if r.resumed_from else ""),
                str(r.steps),
                loss(r.losses[0] if r.losses else None),
                loss(r.losses[-1] if r.losses else None),
                loss(r.val_losses[-1]["loss"] if r.val_losses else None),
                f"{r.tokens_per_s:.0f}",
                f"{r.ended - r.started:.0f}",
                r.adapter or "(see below)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
