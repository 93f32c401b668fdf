"""Run many DDFT jobs at once on one Ray cluster.

Each job's driver is a zero-CPU Ray task that calls TorchTrainer.fit(), so the jobs run side
by side and Ray's scheduler queues the workers that don't fit yet instead of deadlocking.
One job failing does not stop the others.
"""

from __future__ import annotations

import time

from ddft.config import PipelineConfig
from ddft.train.job import JobResult, run_job


def _drive(cfg_json: str, name: str, force: bool) -> JobResult:
    cfg = PipelineConfig.model_validate_json(cfg_json)
    started = time.time()
    try:
        return run_job(cfg, cfg.job(name), force=force)
    except Exception as err:  # reported in the table; the other jobs go on
        return JobResult(
            name, cfg.job(name).modality, "failed", started, time.time(), error=f"{type(err).__name__}: {err}"[:2000]
        )


def run_all(cfg: PipelineConfig, only: list[str] | None = None, force: bool = False) -> list[JobResult]:
    """Every job (or those named in `only`) at once; a job already published from the same
    settings and data is skipped unless `force`."""
    import ray

    names = [j.name for j in cfg.jobs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"--only names unknown jobs {unknown}; jobs in the config: {names}")
    chosen = [n for n in names if not only or n in only]
    drive = ray.remote(num_cpus=0, max_retries=0)(_drive)
    refs = [drive.remote(cfg.model_dump_json(), n, force) for n in chosen]
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
