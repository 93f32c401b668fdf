"""make bench-train: what Ray Train + Ray Data cost over a hand-written PEFT loop, on one LoRA job.

Both ways train the same job of a config (default: the demo's video job on the embedded base)
on the same prepared samples, in the same order, for the same steps, with the same code for the
model, LoRA, optimizer and batches (ddft.train.loop), and the same torch threads:

  plain  one process: the prepared train rows read from the parquet shards with pyarrow, then a
         plain PyTorch loop (forward, backward, AdamW, cosine schedule).
  ray    ddft.train.job.run_job: a TorchTrainer with one worker (--cpus CPUs), data through Ray
         Data's streaming split, metrics reported as the job config says, a checkpoint at the end,
         on a local Ray cluster started for it. Nothing is published.

Throughput is tokens processed (prompt, media placeholders and answer) per second, over the
steps after --warmup steps (steady state). `ray_startup_s` is the Ray run's wall time not spent
in training steps (materializing the data, starting the worker, loading the base; and the final
checkpoint).
The plain loop runs before any Ray process exists and again after the cluster is gone; the Ray
rate is compared with their mean (plain_drift says how far the machine's speed moved meanwhile).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch

from ddft import config
from ddft.store import Store


def steady_rate(history: list[dict], warmup: int) -> float:
    """Tokens/s between the end of step `warmup` and the last step."""
    a, b = history[warmup - 1], history[-1]
    return (b["tokens"] - a["tokens"]) / (b["seconds"] - a["seconds"])


def prepared_rows(store: Store, modality: str, version: str) -> dict:
    """The train rows of a prepared version, in file and row order, as numpy-ready columns."""
    from ddft.data.prepare import good_rows

    columns = ("input_ids", "labels", "pixels", "pixel_shape")
    rows = good_rows(store, modality, version, ("train",), columns)
    return {k: [r[k] for r in rows] for k in columns}


def plain_loop(cfg: config.PipelineConfig, job: config.JobConfig, steps: int, threads: int) -> list[dict]:
    """The same job as a hand-written single-process loop; returns per-step {tokens, seconds}."""
    from ddft.data.prepare import latest_version
    from ddft.models.load import load_base, local_base_dir
    from ddft.train.loop import accumulate, collate, lora_model, optimizer_for, optimizer_step

    torch.set_num_threads(threads)
    torch.manual_seed(job.optim.seed)
    store = Store.from_config(cfg.store)
    rows = prepared_rows(store, job.modality, latest_version(store, job.modality))
    base, processor = load_base(local_base_dir(store, cfg.base.id))
    model = lora_model(base, job.lora, job.modality)
    optim = job.optim
    optimizer, scheduler = optimizer_for(model, optim, steps)
    model.train()
    n, bs, history, tokens, seconds, i = len(rows["input_ids"]), optim.batch_size, [], 0, 0.0, 0
    while len(history) < steps:  # the job's own step (ddft.train.loop), fed from memory
        started = time.time()
        for _ in range(optim.grad_accum):
            idx = [(i + k) % n for k in range(bs)]
            i = (i + bs) % n
            batch = collate({k: [v[j] for j in idx] for k, v in rows.items()}, processor)
            tokens += accumulate(model, batch, optim.grad_accum)[1]
        optimizer_step(optimizer, scheduler)
        seconds += time.time() - started
        history.append({"step": len(history) + 1, "tokens": tokens, "seconds": seconds})
    return history


def ray_run(cfg: config.PipelineConfig, job: config.JobConfig) -> tuple[list[dict], float, float]:
    """run_job on a fresh local cluster; (per-step history, wall seconds, training seconds)."""
    from ddft.cluster import ray_session
    from ddft.train.job import run_job

    with ray_session(num_cpus=job.resources.cpus_per_worker):
        t0 = time.time()
        result = run_job(cfg, job, force=True, publish_adapter=False)
        wall = time.time() - t0
    store = Store.from_config(cfg.store)
    run_key = result.run.removeprefix(store.uri + "/")
    states = [store.read_json(k) for k in store.list(run_key) if k.endswith("/train_state.json")]
    state = max(states, key=lambda s: s["step"])
    return state["history"], wall, state["seconds"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/demo.yaml")
    ap.add_argument("--job", default="video", help="the config's job to run (default video)")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps each way (default 16)")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the rate (default 4)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) for each way (default 2)")
    ap.add_argument(
        "--ray-niceness",
        type=int,
        default=None,
        help="also run the Ray way with its workers at this niceness (Ray's own default is 15) and report it",
    )
    args = ap.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        sys.exit(f"--warmup {args.warmup} must be between 1 and --steps {args.steps} - 1")

    cfg = config.load(args.config)
    base_job = cfg.job(args.job)
    job = base_job.model_copy(
        update={
            "name": f"bench-{base_job.name}",
            "optim": base_job.optim.model_copy(update={"max_steps": args.steps, "checkpoint_every": 0}),
            "resources": base_job.resources.model_copy(update={"num_workers": 1, "cpus_per_worker": args.cpus}),
        }
    )

    from ddft.cluster import ray_session
    from ddft.data.prepare import prepare_all

    with ray_session(num_cpus=args.cpus):  # base in the store, data prepared (reused when unchanged)
        for p in prepare_all(cfg.model_copy(update={"jobs": [job]})):
            print("prepared " + p.summary(), flush=True)

    # plain, ray, plain again: this machine's speed drifts (the plain rate moved 124 -> 256 tokens/s
    # between runs here), so the Ray run is compared with the mean of the runs on either side of it.
    plain = plain_loop(cfg, job, args.steps, args.cpus)
    print(f"plain: {args.steps} steps, {plain[-1]['tokens']} tokens in {plain[-1]['seconds']:.1f} s", flush=True)
    history, wall, trained = ray_run(cfg, job)
    print(
        f"ray:   {len(history)} steps, {history[-1]['tokens']} tokens in {trained:.1f} s (run wall {wall:.1f} s)",
        flush=True,
    )
    if [h["tokens"] for h in history] != [h["tokens"] for h in plain]:
        print("warning: the two ways saw different token counts per step", file=sys.stderr)
    other = None
    if args.ray_niceness is not None:
        niced = job.model_copy(update={"resources": job.resources.model_copy(update={"niceness": args.ray_niceness})})
        other, _, other_trained = ray_run(cfg, niced)
        print(f"ray at niceness {args.ray_niceness}: {len(other)} steps in {other_trained:.1f} s", flush=True)
    again = plain_loop(cfg, job, args.steps, args.cpus)
    print(f"plain: {args.steps} steps again, {again[-1]['seconds']:.1f} s", flush=True)

    ray_rate = steady_rate(history, args.warmup)
    before, after = steady_rate(plain, args.warmup), steady_rate(again, args.warmup)
    plain_rate = (before + after) / 2
    print(
        json.dumps(
            {
                "bench": "train",
                "job": job.modality,
                "base": cfg.base.id,
                "steps": args.steps,
                "warmup_steps": args.warmup,
                "cpus": args.cpus,
                "ray_tokens_per_s": round(ray_rate, 2),
                "plain_tokens_per_s": round(plain_rate, 2),
                "ratio": round(ray_rate / plain_rate, 3),
                "plain_drift": round(after / before, 3),  # far from 1: the machine's speed changed; rerun
                "ray_startup_s": round(wall - trained, 1),
                "ray_niceness": job.resources.niceness if job.resources.niceness is not None else 15,
                **(
                    {f"ratio_at_niceness_{args.ray_niceness}": round(steady_rate(other, args.warmup) / plain_rate, 3)}
                    if other
                    else {}
                ),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
