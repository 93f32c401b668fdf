"""One DDFT job: a Ray Train TorchTrainer over the prepared data of one modality (or of all of
them, for the joint job), checkpointing into the store, then publishing the final adapter to
adapters/ddft/<modality>/v<N>/.

A job is identified by a fingerprint of what decides its result (its settings, the prepared data
versions, the base). The Ray Train run is named after it, so a worker that dies, or a driver
that is resubmitted, resumes from the run's latest checkpoint; and a job whose adapter was
already published from the same fingerprint is not retrained unless forced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddft.adapters.registry import PLATFORM_OWNER, publish, read_manifest
from ddft.config import JOINT, MODALITIES, JobConfig, TrainConfig
from ddft.data.prepare import latest_version, prepared_key, read_prepared
from ddft.models.info import BaseInfo, base_info
from ddft.store import Store
from ddft.train.loop import TrainState, WorkerConfig, train_loop


@dataclass
class JobResult:
    name: str
    modality: str
    status: str  # "succeeded" | "skipped" (already published from the same fingerprint) | "failed"
    started: float
    ended: float
    steps: int = 0
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    tokens_per_s: float = 0.0  # over training steps only: set-up and restarts are not counted
    resumed_from: list = field(default_factory=list)  # steps a restarted worker went on from
    nodes: list = field(default_factory=list)  # Ray node ids its rank 0 ran on: the first, then after each restart
    adapter: str | None = None  # store URI of the published version
    run: str | None = None  # store URI of the Ray Train run (checkpoints, metrics)
    error: str | None = None


def job_modalities(job: JobConfig) -> tuple[str, ...]:
    return MODALITIES if job.modality == JOINT else (job.modality,)


def dataset_versions(store: Store, job: JobConfig) -> dict[str, str]:
    return {m: job.dataset_version or latest_version(store, m) for m in job_modalities(job)}


def job_fingerprint(job: JobConfig, versions: dict[str, str], base: BaseInfo) -> str:
    """What decides the trained weights; not where they run (CPUs, GPUs) or how often they are saved."""
    settings = job.model_dump(
        mode="json",
        exclude={
            "max_failures": True,
            "optim": {"checkpoint_every"},
            "resources": {"cpus_per_worker", "gpus_per_worker", "torch_threads", "niceness"},
        },
    )
    blob = json.dumps({"job": settings, "data": versions, "base": base.fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_name(job: JobConfig, fingerprint: str) -> str:
    return f"{job.name}-{fingerprint}"


def draw(ds, n: int, seed: int, what: str = "the"):
    """n rows of ds: whole passes over it, then a seeded choice of its rows (by id) for the rest."""
    import numpy as np

    ids = sorted(r["id"] for r in ds.select_columns(["id"]).take_all())
    if not ids:
        raise ValueError(f"no {what} train rows to draw {n} samples from: prepare that data first")
    passes, rest = divmod(n, len(ids))
    chosen = set(np.random.default_rng(seed).choice(ids, rest, replace=False).tolist()) if rest else set()
    # An expression filter, not a row function: rows through Python come back with their lists
    # re-typed (int32 -> int64), and a batch spanning both kinds fails to concatenate.
    from ray.data.expressions import col

    parts = [ds] * passes + ([ds.filter(expr=col("id").is_in(sorted(chosen)))] if rest else [])
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _datasets(
    store: Store, versions: dict[str, str], seed: int, samples: dict[str, int] | None = None
) -> tuple[dict, int, bool]:
    """Train (and val, when there is any) datasets; the joint job's modalities shuffled together,
    each drawn to its number of `samples` when the job gives them (the equal-budget baseline)."""
    import ray

    def read(split: str):
        parts = [read_prepared(store, m, v, split=split) for m, v in versions.items()]
        if samples and split == "train":
            parts = [draw(p, samples[m], seed, m) for p, m in zip(parts, versions)]
        return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:]).random_shuffle(seed=seed)

    # Materialized first: train workers may hold every CPU, and a lazy read would then starve.
    # In file order, so that every run (and a resumed one) sees the same sequence.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    train = read("train").materialize()
    has_val = any(
        store.read_json(f"{prepared_key(m, v)}/manifest.json")["counts"].get("val") for m, v in versions.items()
    )
    datasets = {"train": train} | ({"val": read("val").materialize()} if has_val else {})
    return datasets, train.count(), has_val


def worker_config(cfg: TrainConfig, job: JobConfig, num_rows: int, has_val: bool = False) -> WorkerConfig:
    """Everything a worker needs, typed (it crosses process boundaries pickled)."""
    return WorkerConfig(
        store=cfg.store.model_copy(update={"uri": Store.from_config(cfg.store).uri}),  # absolute
        base_id=cfg.base.id,
        modality=job.modality,
        num_rows=num_rows,
        has_val=has_val,
        lora=job.lora,
        optim=job.optim,
        precision=job.precision,
        gradient_checkpointing=job.gradient_checkpointing,
        torch_threads=job.resources.torch_threads,
    )


def _skipped(store: Store, job: JobConfig, fingerprint: str, started: float) -> JobResult | None:
    """The already published adapter of this exact job, if there is one."""
    manifest = read_manifest(store, PLATFORM_OWNER, job.name)
    if not manifest or manifest.metrics.get("job_fingerprint") != fingerprint:
        return None
    m = manifest.metrics
    return JobResult(
        job.name,
        job.modality,
        "skipped",
        started,
        time.time(),
        steps=m.get("steps", 0),
        losses=[m.get("first_loss"), m.get("last_loss")],
        val_losses=m.get("val_losses", []),
        tokens_per_s=m.get("tokens_per_s", 0.0),
        adapter=store.url(manifest.key),
    )


def video_sampling(store: Store, cfg: TrainConfig, versions: dict[str, str]) -> dict:
    """How the job's videos were sampled (frames, frame_strategy), for its manifest: serving samples a
    video the way its adapter saw them. From the prepared video version it trains on (a pinned
    dataset_version may predate the config's data.frames), else the config; None for a job without videos.
    "steps" is recorded as it is: serving has no annotations to follow and maps it to its own strategy."""
    if "video" not in versions:
        return {"frames": None, "frame_strategy": None}
    prepared = store.read_json(f"{prepared_key('video', versions['video'])}/manifest.json")
    return {
        "frames": prepared.get("frames") or cfg.data.frames,
        "frame_strategy": prepared.get("frame_strategy") or cfg.data.frame_strategy,
    }


def _niceness(value: int | None) -> dict:
    """The raylet starts a runtime env's workers at RAY_worker_niceness (Ray's own default: 15)."""
    return {} if value is None else {"RAY_worker_niceness": str(value)}


def run_job(cfg: TrainConfig, job: JobConfig, force: bool = False, publish_adapter: bool = True) -> JobResult:
    """Train one job (or find it already done) and publish its adapter; `publish_adapter=False`
    trains without publishing (benchmarks)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # --- what to run ---
    started = time.time()
    store = Store.from_config(cfg.store)
    base = base_info(store, cfg.base.id)
    versions = dataset_versions(store, job)
    fingerprint = job_fingerprint(job, versions, base)
    if not force and (done := _skipped(store, job, fingerprint, started)):
        return done
    name = run_name(job, fingerprint) + (time.strftime("-%Y%m%d-%H%M%S") if force else "")
    run_uri = store.url(f"runs/{name}")

    # --- train: the same name resumes the run's latest checkpoint (after a crash or a resubmit) ---
    datasets, num_rows, has_val = _datasets(store, versions, job.optim.seed, job.samples)
    if num_rows == 0:
        raise ValueError(f"job {job.name}: prepared data {versions} has no train rows")
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same order on every run: a resumed run skips exactly what it saw
    fs, runs_path = store.fs_path("runs")
    res = job.resources
    trainer = TorchTrainer(
        # The typed config bound here, not train_loop_config: that one Ray also exports to the
        # dashboard's run state, store credentials included.
        functools.partial(train_loop, worker_config(cfg, job, num_rows, has_val)),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=runs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=job.max_failures),
            # Named in the workers' environment: logs, `ps e` and operators can tell jobs apart.
            worker_runtime_env={"env_vars": {"DDFT_JOB": job.name, "DDFT_RUN": name, **_niceness(res.niceness)}},
        ),
        datasets=datasets,
        # One worker reads the (materialized) data itself: a streaming split would add a coordinator
        # actor that only costs CPU (4% of this 2-core node in bench-train) when there's no one to split with.
        dataset_config=ray.train.DataConfig(
            datasets_to_split="all" if res.num_workers > 1 else [], execution_options=ingest
        ),
    )
    result = trainer.fit()

    # --- publish the final checkpoint's adapter ---
    with result.checkpoint.as_directory() as ckpt:
        state = TrainState(**json.loads((Path(ckpt) / "train_state.json").read_text()))
        tokens_per_s = state.tokens / max(state.seconds, 1e-9)
        manifest = None
        if publish_adapter:
            manifest = publish(
                store,
                Path(ckpt) / "adapter",
                owner=PLATFORM_OWNER,
                name=job.name,  # two jobs of one modality never collide
                modality=job.modality,
                base=base,
                source="trained",
                metrics={
                    "job": job.name,
                    "job_fingerprint": fingerprint,
                    "dataset_versions": versions,
                    "steps": state.step,
                    "first_loss": state.losses[0],
                    "last_loss": state.losses[-1],
                    "val_losses": state.val_losses,
                    "tokens_per_s": round(tokens_per_s, 2),
                    "resumed_from": state.resumed_from,
                    "run": run_uri,
                },
                **video_sampling(store, cfg, versions),
            )
    return JobResult(
        job.name,
        job.modality,
        "succeeded",
        started,
        time.time(),
        steps=state.step,
        losses=state.losses,
        val_losses=state.val_losses,
        tokens_per_s=tokens_per_s,
        resumed_from=state.resumed_from,
        nodes=state.nodes,
        adapter=store.url(manifest.key) if manifest else None,
        run=run_uri,
    )
