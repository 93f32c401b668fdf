"""make bench-video: how many video samples the video adapter needs before it reads the video.

The quality bench (bench/quality.py, make bench-quality) trains the video adapter on 40 samples, and it ignores the
video. This trains the video job alone, once per --steps value (batch 2, the quality bench's LoRA
and learning rates), on a synthetic kitchen of --recipes recipes (the quality bench's kitchen
otherwise: the same 6 trained and 2 held-out dishes), one job after another with every CPU of
the cluster, then measures each adapter two ways:

  eval   `ddft eval`'s video rows: held-out (dishes never trained on) with matched and mismatched
         videos (the gap is what the adapter got from the video), and in-distribution.
  reads  the loss of --probe training videos' own recipes (videos of different dishes) given
         their own video, the next one's, and black frames. An adapter that ignores the video
         has three equal losses.

Measured on 2 cores (README, Results). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ddft.config import PipelineConfig, validate
from ddft.store import Store

VIDEO = "video"


def budget_config(store_uri: str, recipes: int, steps: list[int], cpus: int) -> PipelineConfig:
    """The quality bench's config (its video job's LoRA and optimizer, its kitchen), the video job
    once per step count with every CPU, on a kitchen of `recipes` recipes."""
    from bench.quality import quality_config

    cfg = quality_config(store_uri).model_dump()
    (video,) = [j for j in cfg["jobs"] if j["name"] == VIDEO]
    jobs = [
        {
            **video,
            "name": f"video-{n}",
            "resources": {**video["resources"], "cpus_per_worker": cpus, "torch_threads": cpus},
            "optim": {**video["optim"], "max_steps": n},
        }
        for n in steps
    ]
    # only videos are trained here: the fewest photos and QA pairs the kitchen takes
    kitchen = {**cfg["data"]["synthetic"], "recipes": recipes, "images_per_dish": 2, "qa_pairs": 4}
    return validate(PipelineConfig, {**cfg, "data": {**cfg["data"], "synthetic": kitchen}, "jobs": jobs})


def reads(store: Store, base_id: str, adapter, probe: int) -> dict:
    """Mean answer loss of `probe` training videos of different dishes: own video, the next one's, black."""
    import numpy as np
    import torch
    from peft import PeftModel

    from ddft.adapters.registry import download
    from ddft.data.prepare import good_rows, latest_version
    from ddft.models.load import load_base, local_base_dir
    from ddft.prompts import pad_batch, pixel_inputs

    rows, seen = [], set()
    for r in good_rows(
        store,
        VIDEO,
        latest_version(store, VIDEO),
        ("train",),
        ("id", "input_ids", "labels", "pixels", "pixel_shape", "answer"),
    ):
        dish = r["answer"].splitlines()[-2]  # "N. Serve the <dish>."
        if dish not in seen and len(rows) < probe:
            seen.add(dish)
            rows.append(r)
    model, processor = load_base(local_base_dir(store, base_id))
    with tempfile.TemporaryDirectory(prefix="ddft-probe-") as tmp:
        model = PeftModel.from_pretrained(model, str(download(store, adapter, Path(tmp)))).eval()
    video = [np.frombuffer(r["pixels"], np.uint8).reshape(r["pixel_shape"]) for r in rows]
    shown = {"own": video, "another": video[1:] + video[:1], "black": [np.zeros_like(v) for v in video]}
    out = {}
    for name, frames in shown.items():
        losses = []
        for r, v in zip(rows, frames):
            with torch.no_grad():
                batch = pad_batch([r], processor.tokenizer.pad_token_id)
                losses.append(float(model(**batch, **pixel_inputs(processor, VIDEO, [v])).loss))
        out[name] = round(sum(losses) / len(losses), 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="store-video-budget", help="a store folder or URI of its own")
    ap.add_argument("--recipes", type=int, default=36, help="kitchen recipes (the quality bench's: 12)")
    ap.add_argument("--steps", default="80,240", help="one video job per value, batch 2 (the quality bench's: 20)")
    ap.add_argument("--probe", type=int, default=4, help="training videos the loss probe reads")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)

    from bench.quality import MAX_NEW_TOKENS
    from ddft.adapters.registry import PLATFORM_OWNER, read_manifest
    from ddft.cluster import ray_session
    from ddft.data.prepare import prepare_all
    from ddft.eval import evaluate
    from ddft.train.launcher import run_all, table

    steps = [int(s) for s in args.steps.split(",")]
    cfg = budget_config(args.store, args.recipes, steps, args.cpus)
    store = Store.from_config(cfg.store)
    result = {"bench": "video_budget", "recipes": args.recipes, "runs": []}
    with ray_session(num_cpus=args.cpus):
        t0 = time.monotonic()
        prepared = prepare_all(cfg)[0]
        result["train_videos"] = prepared.counts.get("train", 0)
        result["prepare_s"] = round(time.monotonic() - t0, 1)
        trained = [run_all(cfg, [j.name])[0] for j in cfg.jobs]  # one at a time, every CPU each
    print(table(trained), flush=True)
    for job, done in zip(cfg.jobs, trained):
        if done.status != "succeeded":
            sys.exit(f"job {job.name} {done.status}: {done.error}")
    adapters = [read_manifest(store, PLATFORM_OWNER, j.name) for j in cfg.jobs]
    rows = evaluate.evaluate(
        store, cfg.base.id, modalities=(VIDEO,), adapters={VIDEO: adapters}, max_new_tokens=MAX_NEW_TOKENS
    )
    print(evaluate.table(rows), flush=True)
    pick = lambda ds, ref, inputs: next(r for r in rows if (r["dataset"], r["model"], r["inputs"]) == (ds, ref, inputs))  # noqa: E731
    for n, adapter, done in zip(steps, adapters, trained):
        run = {"steps": n, "samples": n * 2, "train_s": round(done.ended - done.started, 1)}
        for ds, inputs in (("held-out", "matched"), ("held-out", "mismatched"), ("in-distribution", "matched")):
            r = pick(ds, adapter.ref, inputs)
            for metric in ("content", "ingredient_f1", "quantity_accuracy"):
                run[f"{ds}_{inputs}_{metric}"] = r[metric]
        run["ingredient_f1_gap"] = round(
            run["held-out_matched_ingredient_f1"] - run["held-out_mismatched_ingredient_f1"], 3
        )
        run["loss_given"] = reads(store, cfg.base.id, adapter, args.probe)
        print(f"video-{n}:", json.dumps(run), flush=True)
        result["runs"].append(run)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
