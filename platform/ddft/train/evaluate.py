"""Score the base and each published adapter on held-out prepared data, per modality.

The held-out rows are the prepared shards' `val` (and `test`) splits; answers are generated with
the serving engine itself (greedy), so the numbers are what users would get. Videos in YouCook2's
format, when the store has them, are scored too (steps against steps: YouCook2 lists no
ingredients). The table goes to the store (eval/<timestamp>.{md,json}) and each adapter's scores
into its manifest's metrics.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial

import numpy as np

from ddft.adapters.registry import PLATFORM_OWNER, Manifest, read_manifest
from ddft.config import JOINT, DataConfig
from ddft.data.prepare import good_rows, latest_version
from ddft.prompts import QUESTIONS
from ddft.engines.base import GenerateRequest
from ddft.store import Store
from ddft.train import metrics

HELD_OUT = ("val", "test")
# Room for the longest reference answer of each modality (a dish name, a QA answer, a recipe).
MAX_NEW_TOKENS = {"image": 16, "text": 64, "video": 256}


def held_out(store: Store, modality: str, limit: int | None = None) -> list[dict]:
    rows = good_rows(store, modality, latest_version(store, modality), HELD_OUT,
                     ("id", "question", "answer", "pixels", "pixel_shape"))
    return sorted(rows, key=lambda r: r["id"])[:limit]


def youcook2_rows(store: Store, data: DataConfig, limit: int | None = None) -> tuple[list[dict], list[str]]:
    """YouCook2 validation videos as eval rows (frames sampled like training), and the videos that
    could not be used, each with its reason (reported, never dropped silently)."""
    from ddft.data.formats import read_youcook2
    from ddft.data.media import MediaError, sample_frames

    root = f"{data.raw_prefix.rstrip('/')}/{data.youcook2.strip('/')}"
    annotations = f"{root}/youcookii_annotations_trainval.json"
    if not store.exists(annotations):
        return [], []
    videos = read_youcook2(store, annotations, subset="validation")
    files = {k.rsplit("/", 1)[-1].rsplit(".", 1)[0]: k for k in store.list(f"{root}/raw_videos/validation")}
    rows, skipped = [], [f"{vid}: {reason}" for vid, reason in videos.problems]
    for v in videos[:limit]:
        key = files.get(v.id)
        if key is None:
            skipped.append(f"{v.id}: no video under {store.url(root)}/raw_videos/validation/{v.recipe_type}/")
            continue
        try:
            frames = sample_frames(store.read_bytes(key), data.frames, strategy="uniform")
        except MediaError as err:
            skipped.append(f"{v.id}: {err}")
            continue
        rows.append({"id": v.id, "question": QUESTIONS["video"], "answer": v.text, "pixels": frames})
    return rows, skipped


def _requests(rows: list[dict], modality: str, adapter: Manifest | None, max_new_tokens: int):
    for r in rows:
        pixels = r["pixels"]
        if isinstance(pixels, bytes):  # a prepared row
            pixels = np.frombuffer(pixels, np.uint8).reshape(r["pixel_shape"])
        yield GenerateRequest(modality=modality, question=r["question"], pixels=pixels, adapter=adapter,
                              max_new_tokens=max_new_tokens)


def evaluate(store: Store, base_id: str, modalities=("image", "video", "text"), adapters: dict | None = None,
             limit: int | None = None, max_new_tokens: int | dict | None = None, batch: int = 4,
             data: DataConfig | None = None) -> list[dict]:
    """One row per (dataset, modality, model): the base, then each adapter given for that modality
    (default: the platform's DDFT adapter and, when one was trained, the joint adapter beside
    it); each row holds its metrics. With `data`, YouCook2-format videos are scored as well."""
    from ddft.engines.hf import HFEngine

    engine = HFEngine(store, base_id, cache_size=4)
    joint = read_manifest(store, PLATFORM_OWNER, JOINT)
    sets = [("held-out", m, held_out(store, m, limit), partial(metrics.score, m), []) for m in modalities]
    if data is not None and "video" in modalities:
        rows, skipped = youcook2_rows(store, data, limit)
        sets.append(("youcook2", "video", rows, metrics.score_steps, skipped))
    results = []
    for dataset, modality, rows, score, skipped in sets:
        if not rows:
            continue
        default = [m for m in (read_manifest(store, PLATFORM_OWNER, modality), joint) if m]
        budget = max_new_tokens if isinstance(max_new_tokens, int) else \
            {**MAX_NEW_TOKENS, **(max_new_tokens or {})}[modality]
        for adapter in [None] + (adapters or {}).get(modality, default):
            reqs = list(_requests(rows, modality, adapter, budget))
            preds = [r.text for i in range(0, len(reqs), batch) for r in engine.generate(reqs[i:i + batch])]
            scores = score(preds, [r["answer"] for r in rows])
            results.append({"dataset": dataset, "modality": modality,
                            "model": adapter.ref if adapter else f"base:{base_id}", "samples": len(rows),
                            "skipped": len(skipped), **scores,
                            "example": {"id": rows[0]["id"], "prediction": preds[0], "reference": rows[0]["answer"]}})
            if skipped:
                results[-1]["skipped_reasons"] = skipped[:5]
    return results


def table(results: list[dict]) -> str:
    columns = ["dataset", "modality", "model", "samples", "skipped", "accuracy", "rouge_l", "bleu4", "ingredient_f1",
               "quantity_accuracy", "step_count_error"]
    return metrics.markdown_table(results, columns)


def save(store: Store, results: list[dict]) -> str:
    """Write the table (markdown + JSON) and put each adapter's scores into its manifest."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    key = f"eval/{stamp}"
    store.write_text(f"{key}.md", table(results) + "\n")
    store.write_json(f"{key}.json", results)
    for r in results:
        if r["model"].startswith("base:"):
            continue
        owner, name, version = r["model"].split("/")
        manifest = read_manifest(store, owner, name, int(version.lstrip("v")))
        scores = {k: v for k, v in r.items() if k not in ("dataset", "modality", "model", "example")}
        evals = {**manifest.metrics.get("eval", {}), r["dataset"]: {**scores, "report": store.url(f"{key}.md")}}
        manifest.metrics = {**manifest.metrics, "eval": evals}
        store.write_json(f"{manifest.key}/manifest.json", asdict(manifest))
    return store.url(f"{key}.md")

