"""One DDFT job: a Ray Train TorchTrainer over the prepared data of one modality, checkpointing
into the store, then publishing the final adapter to adapters/ddft/<modality>/v<N>/."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddft.adapters.registry import PLATFORM_OWNER, publish
from ddft.config import JobConfig, PipelineConfig
from ddft.data.prepare import latest_version, read_prepared
from ddft.models.load import base_info
from ddft.store import Store
from ddft.train.loop import train_loop


@dataclass
class JobResult:
    name: str
    modality: str
    status: str  # "succeeded" | "failed"
    started: float
    ended: float
    steps: int = 0
    losses: list = field(default_factory=list)
    tokens_per_s: float = 0.0
    adapter: str | None = None  # store URI of the published version
    error: str | None = None


def loop_config(cfg: PipelineConfig, job: JobConfig, num_rows: int) -> dict:
    """Everything a worker needs, as plain data (it crosses process boundaries)."""
    return {"store": cfg.store.model_dump() | {"uri": Store.from_config(cfg.store).uri},  # absolute
            "base_id": cfg.base.id, "modality": job.modality, "num_rows": num_rows,
            "lora": job.lora.model_dump(), "optim": job.optim.model_dump(), "precision": job.precision,
            "gradient_checkpointing": job.gradient_checkpointing}


def run_job(cfg: PipelineConfig, job: JobConfig) -> JobResult:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.time()
    store = Store.from_config(cfg.store)
    base = base_info(store, cfg.base.id)
    version = job.dataset_version or latest_version(store, job.modality)
    # Materialized first: train workers may hold every CPU, and a lazy read would then starve.
    train_ds = read_prepared(store, job.modality, version).materialize()
    num_rows = train_ds.count()
    if num_rows == 0:
        raise ValueError(f"job {job.name}: prepared {job.modality} data {version} has no train rows")
    fs, runs_path = store.fs_path("runs")
    res = job.resources
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg, job, num_rows),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": res.cpus_per_worker,
                                                           "GPU": res.gpus_per_worker}),
        run_config=RunConfig(name=f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=runs_path,
                             storage_filesystem=fs, checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "train_state.json").read_text())
        manifest = publish(store, Path(ckpt) / "adapter", owner=PLATFORM_OWNER, name=job.modality,
                           modality=job.modality, base=base, source="trained",
                           metrics={"job": job.name, "dataset_version": version, "steps": state["step"],
                                    "first_loss": state["losses"][0], "last_loss": state["losses"][-1],
                                    "run": result.path})
    return JobResult(job.name, job.modality, "succeeded", started, time.time(), steps=state["step"],
                     losses=state["losses"], tokens_per_s=state["tokens"] / max(state["seconds"], 1e-9),
                     adapter=store.url(manifest.key))
