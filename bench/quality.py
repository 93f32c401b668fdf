"""make bench-quality: the point of DDFT, measured on the synthetic kitchen with the embedded base.

Trains the image, video and text adapters and the equal-budget joint adapter (the same samples of
each modality, the same steps x batch in all), runs `ddft eval` (held-out sets with matched and
mismatched media, in-distribution sets), and reports what the paper compares:

- each directed adapter against the base on its own modality's held-out set, on a metric that a
  well-formatted answer about the wrong dish can't pass (BARS, FLOORS; tests/test_bars.py proves
  that a constant recipe and a wrong-dish recipe fail them);
- whether the media adapters read their media: shown another sample's video (or image), the
  video adapter's ingredient F1 and the image adapter's accuracy should fall (GAPS);
- directed against the joint adapter trained on the same budget, per modality.

With --parity it then checks that the vllm engine (real vLLM, its own venv) gives the hf engine's
greedy tokens for the base and every trained adapter (first token on all, whole answer on >= 90%).

This was the quality module of `make test` (27 of its 64 minutes): evidence of how well adapters
learn, not a per-commit check. `make test` keeps a short learning check (tests/test_learning.py).
The table and its chart are saved into the store as `ddft eval` does. The last stdout line is one
JSON object; the exit code is 0 whatever the verdicts (they are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ddft.config import PipelineConfig, validate
from ddft.store import Store

MODALITIES = ("image", "video", "text")
# 48 recipe videos of free combinations of foods (34 train, 14 val), 4 of each held-out dish (test)
KITCHEN = {
    "seed": 0,
    "dishes": 6,
    "held_out_dishes": 2,
    "images_per_dish": 8,
    "recipes": 48,
    "held_out_videos": 4,
    "qa_pairs": 60,
}
# Held-out margins over the base, per modality's headline metric.
BARS = {("image", "accuracy"): 0.30, ("video", "content"): 0.15, ("text", "rouge_l"): 0.10}
# Held-out floors whatever the base scores: above every fixed recipe of the kitchen (at most 0.381).
FLOORS = {("video", "content"): 0.45}
# matched - mismatched (another sample's media, the same question and reference), held-out.
GAPS = {("video", "ingredient_f1"): 0.2, ("image", "accuracy"): 0.3}
# (batch, steps): image 180 samples (5 passes over 36 photos), video 400 (about 12 over 34), text 120
BUDGET = {"image": (4, 45), "video": (4, 100), "text": (4, 30)}
# The projector's learning rate per modality. The embedded base's projector comes aligned to the language model's
# words (ddft.models.align): the video adapter keeps it (1e-4, a tenth of LoRA's, as the 7B's jobs), where 1e-2 was
# what read best from a random one (README, "Reading the video")
PROJECTOR_LR = {"video": 1e-4, "joint": 1e-4}  # the joint adapter learns videos too: the same
MAX_NEW_TOKENS = {"video": 160}  # the longest recipe here and some (image and text: evaluate's own)
# --parity: answers long enough to tell the engines apart (a dish name, a QA answer, a recipe's start)
EQUAL_TOKENS = {"image": 16, "text": 32, "video": 48}
EQUAL_PER_MODALITY = 10  # x (base, adapter)


def quality_config(store_uri: str) -> PipelineConfig:
    def job(name, batch, steps=None, **extra):
        # 3 of the cluster's 6 logical CPUs, one torch thread: two jobs at a time on 2 cores
        # (four at once thrashed the caches: 4x slower in all), the others wait in Ray's queue.
        return {
            "name": name,
            "modality": name,
            "resources": {"cpus_per_worker": 3, "torch_threads": 1},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "optim": {
                "lr": 1e-3,
                "projector_lr": PROJECTOR_LR.get(name, 2e-3),
                "max_steps": steps,
                "batch_size": batch,
                "warmup_ratio": 0.1,
                "checkpoint_every": 0,
            },
            **extra,
        }

    # The joint job: one adapter on all modalities mixed, on the directed jobs' budget.
    return validate(
        PipelineConfig,
        {
            "store": {"uri": store_uri},
            # no tenants here: vLLM's max_lora_rank (serve_options) is then the jobs' own rank, the cheapest it serves
            "serve": {"max_lora_rank": 8},
            "base": {"id": "ddft-embedded-smollm2", "build": "embedded"},
            "data": {"synthetic": KITCHEN},
            "jobs": [job(m, b, s) for m, (b, s) in BUDGET.items()] + [job("joint", 4, samples="directed")],
        },
    )


def config_from(path: str) -> PipelineConfig:
    """A pipeline config to measure: it must train the three directed adapters and the joint one, named as here."""
    from ddft.config import ConfigError, load

    cfg = load(path)
    names = {j.name: j.modality for j in cfg.jobs}
    wanted = {m: m for m in MODALITIES} | {"joint": "joint"}
    if missing := [f"{n} ({m})" for n, m in wanted.items() if names.get(n) != m]:
        raise ConfigError(path, [f"bench-quality needs the jobs {', '.join(missing)}: add them to its jobs list"])
    return cfg


def train(cfg: PipelineConfig) -> list:
    """run_all, the joint job's workers placed before the directed jobs ask: its budget is theirs together, so it
    holds one of the two slots for the whole run while they take turns on the other. Left to the scheduler it was
    placed last and ran alone on one core for ~600 s: training took 1068 s here, 867 s placed first."""
    import concurrent.futures

    import ray

    from ddft.train.launcher import run_all

    def placed() -> int:
        return sum(pg["state"] == "CREATED" for pg in ray.util.placement_group_table().values())

    before, names = placed(), [j.name for j in cfg.jobs]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        joint = pool.submit(run_all, cfg, ["joint"])
        deadline = time.monotonic() + 300  # best effort: the order only saves time
        while placed() <= before and not joint.done() and time.monotonic() < deadline:
            time.sleep(1)
        results = run_all(cfg, [n for n in names if n != "joint"]) + joint.result()
    return sorted(results, key=lambda r: names.index(r.name))


def by_key(rows: list[dict]) -> dict:
    """{(set, modality, model name, inputs): row}; the model name is the adapter's ("image", "joint") or "base"."""
    return {
        (r["dataset"], r["modality"], r["model"].split("/")[1] if "/" in r["model"] else "base", r["inputs"]): r
        for r in rows
    }


def shortfalls(by: dict, modality: str) -> list[str]:
    """Where a modality's directed adapter misses its bars (over the base, and matched - mismatched)."""
    out = []
    for (m, metric), margin in BARS.items():
        if m != modality:
            continue
        base, ddft = (by[("held-out", m, name, "matched")][metric] for name in ("base", m))
        bar = max(base + margin, FLOORS.get((m, metric), 0.0))
        if ddft < bar:
            out.append(f"{m} {metric}: DDFT {ddft:.3f} vs base {base:.3f} ({bar:.3f} expected)")
    for (m, metric), bar in GAPS.items():
        if m == modality and (gap := by[("held-out", m, m, "mismatched")]["gap"][metric]) < bar:
            out.append(f"{m} {metric}: matched - mismatched {gap:.3f} (>= {bar} expected)")
    return out


def summary(by: dict) -> dict:
    """The JSON line's figures: per modality its headline metric for the base, the directed adapter (matched and
    mismatched media, and the gap) and the joint adapter, held-out and in-distribution; then the named keys."""
    from ddft.eval.scores import HEADLINE

    out: dict = {}
    for m in MODALITIES:
        metric = HEADLINE[m]
        for ds, tag in (("held-out", "held_out"), ("in-distribution", "in_dist")):
            for name, col in (("base", "base"), (m, "matched"), ("joint", "joint")):
                if (row := by.get((ds, m, name, "matched"))) is not None:
                    out[f"{m}_{tag}_{col}"] = round(row[metric], 3)
        if (swapped := by.get(("held-out", m, m, "mismatched"))) is not None:
            out[f"{m}_held_out_mismatched"] = round(swapped[metric], 3)
            out[f"{m}_held_out_gap"] = round(swapped["gap"][metric], 3)
    video = by[("held-out", "video", "video", "matched")]
    video_swapped = by[("held-out", "video", "video", "mismatched")]
    out["video_f1_matched"] = round(video["ingredient_f1"], 3)
    out["video_f1_gap"] = round(video_swapped["gap"]["ingredient_f1"], 3)
    out["video_qty_gap"] = round(video_swapped["gap"]["quantity_accuracy"], 3)
    out["image_acc_gap"] = round(by[("held-out", "image", "image", "mismatched")]["gap"]["accuracy"], 3)
    out["directed_beats_joint"] = {
        m: by[("held-out", m, m, "matched")][HEADLINE[m]] > by[("held-out", m, "joint", "matched")][HEADLINE[m]]
        for m in MODALITIES
    }
    out["bars_met"] = {m: not shortfalls(by, m) for m in MODALITIES}
    return out


def equality_requests(store: Store) -> list:
    """EQUAL_PER_MODALITY prompts per modality from the prepared data (every split; videos also played backwards to
    reach it), each asked of the base and of that modality's DDFT adapter."""
    import numpy as np

    from ddft.adapters.registry import read_manifest
    from ddft.data.prepare import good_rows, latest_version
    from ddft.engines.base import GenerateRequest

    requests = []
    for modality in MODALITIES:
        rows = good_rows(
            store,
            modality,
            latest_version(store, modality),
            ("train", "val", "test"),
            ("id", "question", "pixels", "pixel_shape"),
        )
        inputs = []
        for r in sorted(rows, key=lambda r: r["id"]):
            pixels = (
                np.frombuffer(r["pixels"], np.uint8).reshape(r["pixel_shape"]).copy() if modality != "text" else None
            )
            inputs.append((r["question"], pixels))
            if modality == "video":
                inputs.append((r["question"], pixels[::-1].copy()))
        adapter = read_manifest(store, "ddft", modality)
        for question, pixels in inputs[:EQUAL_PER_MODALITY]:
            for a in (None, adapter):
                requests.append(GenerateRequest(modality, question, pixels, a, EQUAL_TOKENS[modality]))
    return requests


def parity(cfg: PipelineConfig, store: Store) -> dict:
    """vLLM and hf on the same requests: per (modality, model) how many first tokens and whole answers are equal."""
    from ddft.config import ServeSettings
    from ddft.engines.base import serve_options
    from ddft.engines.hf import HFEngine
    from ddft.engines.vllm_batch import BatchJob, generate_in

    requests = equality_requests(store)
    # vLLM pads every adapter to max_lora_rank: at the adapters' own rank (8) 18 of these took 41 s here, at 64 188 s
    rank = serve_options(cfg, "vllm")["max_lora_rank"]
    t0 = time.monotonic()
    engine_args = {"max_model_len": 1024, "cache_size": 4, "max_lora_rank": rank}
    vllm = generate_in(Path(ServeSettings().vllm.python), BatchJob(store.url(""), cfg.base.id, requests, engine_args))
    t1 = time.monotonic()
    engine = HFEngine(store, cfg.base.id, cache_size=4)
    hf = [res for i in range(0, len(requests), 8) for res in engine.generate(requests[i : i + 8])]
    out = {"vllm_s": round(t1 - t0, 1), "vllm_load_s": round(vllm.load_s, 1), "hf_s": round(time.monotonic() - t1, 1)}
    rows = {}
    for r, v, h in zip(requests, vllm.results, hf):
        key = f"{r.modality}:{r.adapter.ref if r.adapter else 'base'}"
        n, first, whole = rows.get(key, (0, 0, 0))
        ok = not isinstance(v, Exception)
        first += ok and v.token_ids[:1] == h.token_ids[:1]
        rows[key] = (n + 1, first, whole + (ok and v.token_ids == h.token_ids))
    out["rows"] = {k: {"n": n, "first_equal": f, "whole_equal": w} for k, (n, f, w) in rows.items()}
    out["met"] = all(f == n and w >= 0.9 * n for n, f, w in rows.values())
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="store-quality", help="a store folder or URI of its own")
    ap.add_argument("--cpus", type=int, default=6, help="logical CPUs of the local cluster (two jobs at a time)")
    ap.add_argument("--parity", action="store_true", help="then check vLLM's greedy tokens against hf's")
    ap.add_argument(
        "--config",
        help="measure this pipeline config instead of the embedded one (e.g. jobs/configs/video-llava-7b.yaml on GPUs):"
        " its store, base and data, and its jobs named image, video, text and joint",
    )
    args = ap.parse_args(argv)

    from ddft.cluster import ray_session
    from ddft.data.prepare import prepare_all
    from ddft.eval import evaluate
    from ddft.train.launcher import table

    cfg = config_from(args.config) if args.config else quality_config(args.store)
    store = Store.from_config(cfg.store)
    result: dict = {"bench": "quality", "base": cfg.base.id}
    with ray_session(num_cpus=args.cpus):
        t0 = time.monotonic()
        prepare_all(cfg)
        t1 = time.monotonic()
        trained = train(cfg)
    result["prepare_s"], result["train_s"] = round(t1 - t0, 1), round(time.monotonic() - t1, 1)
    result["job_train_s"] = {r.name: round(r.ended - r.started, 1) for r in trained}
    result["budgets"] = {j.name: j.samples or {j.modality: j.optim.max_steps * j.samples_per_step()} for j in cfg.jobs}
    print(table(trained), flush=True)
    if failed := [r for r in trained if r.status not in ("succeeded", "skipped")]:  # skipped: published before
        sys.exit("; ".join(f"job {r.name} {r.status}: {r.error}" for r in failed))
    t2 = time.monotonic()
    rows = evaluate.evaluate(store, cfg.base.id, max_new_tokens=MAX_NEW_TOKENS)
    report = evaluate.save(store, rows)
    result["eval_s"] = round(time.monotonic() - t2, 1)
    print(evaluate.table(rows), flush=True)
    print(f"table: {report}\nchart: {report.png}", flush=True)
    by = by_key(rows)
    result |= summary(by)
    for m in MODALITIES:
        for line in shortfalls(by, m):
            print(f"bar not met: {line}", flush=True)
    result["report"], result["chart"] = str(report), report.png
    if args.parity:
        result["parity"] = parity(cfg, store)
        print("parity:", json.dumps(result["parity"]), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
