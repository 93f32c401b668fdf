"""The pipeline's commands: base, data, train (here or as a Ray job), eval, serve, the store's
adapter listing. Each validates its config first, then calls the library."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ddft.cli.common import FAILED, OK, REPO, UNREACHABLE, USAGE, CliError, load_config, one_line
from ddft.cli.progress import Progress


def cmd_base_build(args) -> int:
    from ddft.models.load import ensure_base
    from ddft.store import Store

    cfg = load_config(args.config)
    info = ensure_base(Store.from_config(cfg.store), cfg.base.id, cfg.base.build, cfg.base.source)
    print(f"base {info.id} at {info.uri} (sha256 {info.fingerprint[:12]})")
    return OK


def cmd_data_prepare(args) -> int:
    from ddft.cluster import ray_session
    from ddft.data.prepare import prepare_all

    cfg = load_config(args.config)
    with ray_session():
        for p in prepare_all(cfg):
            print("prepared " + p.summary())
    return OK


def cmd_train(args) -> int:
    cfg = load_config(args.config)
    if args.address:
        return submit_train(args, cfg)
    if args.no_wait:
        raise CliError(USAGE, "--no-wait needs --address (it submits the training as a Ray job and returns)")
    from ddft.cluster import ray_session
    from ddft.store import Store
    from ddft.train.launcher import RESULTS, run_all, table

    only = [n.strip() for n in args.only.split(",")] if args.only else None
    with ray_session():
        results = run_all(cfg, only, force=args.force)
    print(table(results))
    for r in results:
        if r.error:
            print(f"job {r.name} failed: {r.error}", file=sys.stderr)
    print(f"results: {Store.from_config(cfg.store).url(RESULTS)}/<job>.json")  # what scripts read
    return OK if all(r.status != "failed" for r in results) else FAILED


# -- training as a Ray job ------------------------------------------------------------------------


def job_spec(args, cfg) -> tuple[str, dict]:
    """The entrypoint and runtime_env of `ddft train --address`: jobs/train_all.py from the repo as
    the working dir; the store made absolute (the job runs in a copy of the repo)."""
    from ddft.store import Store

    config = Path(args.config).resolve()
    try:
        config_arg = str(config.relative_to(REPO))
    except ValueError:  # outside the checkout: only a cluster on this machine can read it
        config_arg = str(config)
    entry = ["python", "jobs/train_all.py", "--config", config_arg]
    if args.only:
        entry += ["--only", args.only]
    if args.force:
        entry.append("--force")
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # the store's credentials, if S3
    env["DDFT_STORE"] = Store.from_config(cfg.store).uri
    runtime_env = {
        "working_dir": str(REPO),
        "env_vars": env,
        "excludes": [".git", ".venv", "store", ".demo", "**/__pycache__"],
    }
    return shlex.join(entry), runtime_env


def submit_train(args, cfg) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    entrypoint, runtime_env = job_spec(args, cfg)
    try:
        jobs = JobSubmissionClient(args.address)
    except ConnectionError as err:
        raise CliError(
            UNREACHABLE,
            f"cannot reach the Ray cluster at {args.address} ({one_line(err)}); start one "
            "(make cluster-up) or give its dashboard address, e.g. --address http://127.0.0.1:8265",
        ) from None
    try:
        job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except RuntimeError as err:
        raise CliError(FAILED, f"the cluster at {args.address} refused the job: {one_line(err)[:400]}") from None
    if args.no_wait:
        print(job_id)
        print(
            f"submitted {job_id}: {entrypoint}; follow it with: ray job logs --follow --address {args.address} "
            f"{job_id}",
            file=sys.stderr,
        )
        return OK
    print(f"submitted {job_id}: {entrypoint}", file=sys.stderr)
    status = follow(jobs, job_id, args.quiet)
    if status == JobStatus.SUCCEEDED:
        return OK
    info = jobs.get_job_info(job_id)
    raise CliError(
        FAILED,
        f"job {job_id} {str(status).lower()}: {one_line(info.message or '')[:400]} "
        f"(the log is above; ray job logs --address {args.address} {job_id})",
    )


def follow(jobs, job_id: str, quiet: bool):
    """Stream the job's log to stdout under a status line; return its final JobStatus."""
    import asyncio
    import time

    with Progress(f"job {job_id}", quiet) as progress:
        progress.wait(f"job {job_id} running")

        async def tail():
            async for chunk in jobs.tail_job_logs(job_id):
                progress.write(chunk)

        try:
            asyncio.run(tail())
        except KeyboardInterrupt:
            raise CliError(
                FAILED, f"stopped following; job {job_id} keeps running (ray job stop {job_id} stops it)"
            ) from None
        while not (status := jobs.get_job_status(job_id)).is_terminal():  # the log can end a moment early
            time.sleep(1)
    return status


def cmd_eval(args) -> int:
    from ddft.eval import evaluate
    from ddft.store import Store

    cfg = load_config(args.config, "pipeline")  # data for the sets, serve for the engine that answers
    engine = args.engine or cfg.serve.engine
    python = cfg.serve.vllm.python
    if engine == "vllm" and not Path(python).exists():  # before minutes of reading sets
        raise CliError(
            USAGE,
            f"{'--engine' if args.engine else 'serve.engine'} vllm: no vLLM environment at {python} "
            "(serve.vllm.python): build it with `make venv-vllm`, or evaluate with --engine hf",
        )
    store = Store.from_config(cfg.store)
    results = evaluate.evaluate(
        store,
        cfg.base.id,
        limit=args.limit,
        data=cfg.data,
        engine=engine,
        engine_options=eval_engine_options(cfg, store, engine),
        python=python,
    )
    print(evaluate.table(results))
    for note in results.notes:  # a set not evaluated, rows left out: the table only counts them
        print(f"note: {note}", file=sys.stderr)
    report = evaluate.save(store, results)
    for note in report.notes:  # an adapter deleted meanwhile: its scores are in the report only
        print(f"note: {note}", file=sys.stderr)
    print(f"written to {report} and into the adapters' manifests")
    print(f"chart: {report.png}")
    return OK


def eval_engine_options(cfg, store, engine: str) -> dict:
    """The engine keywords serving would use (engines.base.serve_options), so evaluation answers as the
    served engine does, on this machine's GPU when it has one. vLLM sizes its LoRA slots once, for the
    largest rank among the platform's adapters of this base and the config's jobs."""
    import torch

    from ddft.adapters.registry import PLATFORM_OWNER, list_adapters
    from ddft.engines.base import serve_options
    from ddft.models.info import base_info

    ranks = []
    if engine == "vllm":
        base = base_info(store, cfg.base.id)
        ranks = [m.rank for m in list_adapters(store, PLATFORM_OWNER) if m.base_fingerprint == base.fingerprint]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {**serve_options(cfg, engine, adapter_ranks=ranks), "device": device}


# -- serving -------------------------------------------------------------------------------------


def serve_blocking(config: str, engine: str | None = None) -> None:
    from serve.app import run

    run(config, blocking=True, engine=engine)


def cmd_plan(args) -> int:
    """Every replica's and training worker's memory, item by item, and whether each fits."""
    import yaml

    from ddft import plan
    from ddft.store import Store

    with open(args.config) as f:
        doc = yaml.safe_load(f) or {}
    cfg = load_config(args.config, "pipeline" if isinstance(doc, dict) and "jobs" in doc else "serve")
    made = plan.plans(cfg, Store.from_config(cfg.store), args.gpu_memory_gib)
    print("\n\n".join("\n".join(p.lines()) for p in made))
    return OK if all(p.fits is not False for p in made) else FAILED


def cmd_serve(args) -> int:
    from ddft.models.load import base_info
    from ddft.store import Store

    cfg = load_config(args.config, "serve")
    base_info(Store.from_config(cfg.store), cfg.base.id)  # the base must be there (StoreError names the fix)
    from ddft.cluster import ray_session

    with ray_session(address=args.address):  # the `serve` package is installed beside ddft
        print(f"serving {cfg.base.id} on http://{cfg.serve.host}:{cfg.serve.port} (Ctrl-C stops)", file=sys.stderr)
        try:
            serve_blocking(str(args.config), args.engine)
        except KeyboardInterrupt:
            pass
    return OK


def cmd_adapters_list_store(args) -> int:
    from ddft.adapters.registry import list_adapters
    from ddft.store import Store

    for m in list_adapters(Store.from_config(load_config(args.config, "serve").store)):
        print(f"{m.ref:32} {m.modality:6} base={m.base_model_id} rank={m.rank} source={m.source}")
    return OK
