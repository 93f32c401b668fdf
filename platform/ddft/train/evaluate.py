"""Score the base and each published adapter on held-out prepared data, per modality.

The held-out rows are the prepared shards' `val` (and `test`) splits; answers are generated with
the serving engine itself (greedy), so the numbers are what users would get. The table goes to
the store (eval/<timestamp>.{md,json}) and each adapter's scores into its manifest's metrics.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from ddft.adapters.registry import PLATFORM_OWNER, Manifest, read_manifest
from ddft.data.prepare import latest_version, prepared_key, shard_columns
from ddft.engines.base import GenerateRequest
from ddft.store import Store
from ddft.train import metrics

HELD_OUT = ("val", "test")


def held_out(store: Store, modality: str, limit: int | None = None) -> list[dict]:
    key = prepared_key(modality, latest_version(store, modality))
    cols = ("id", "split", "question", "answer", "pixels", "pixel_shape", "error")
    rows = [r for r in shard_columns(store, key, cols).to_pylist() if not r["error"] and r["split"] in HELD_OUT]
    return sorted(rows, key=lambda r: r["id"])[:limit]


def _requests(rows: list[dict], modality: str, adapter: Manifest | None, max_new_tokens: int):
    for r in rows:
        pixels = (np.frombuffer(r["pixels"], np.uint8).reshape(r["pixel_shape"]) if r["pixels"] else None)
        yield GenerateRequest(modality=modality, question=r["question"], pixels=pixels, adapter=adapter,
                              max_new_tokens=max_new_tokens)


def evaluate(store: Store, base_id: str, modalities=("image", "video", "text"), adapters: dict | None = None,
             limit: int | None = None, max_new_tokens: int = 96, batch: int = 4) -> list[dict]:
    """One row per (modality, model): the base, then each adapter given for that modality
    (default: the platform's DDFT adapter); each row holds its metrics."""
    from ddft.engines.hf import HFEngine

    engine = HFEngine(store, base_id, cache_size=4)
    results = []
    for modality in modalities:
        rows = held_out(store, modality, limit)
        if not rows:
            continue
        candidates = [None] + (adapters or {}).get(modality, [read_manifest(store, PLATFORM_OWNER, modality)])
        for adapter in candidates:
            reqs = list(_requests(rows, modality, adapter, max_new_tokens))
            preds = [r.text for i in range(0, len(reqs), batch) for r in engine.generate(reqs[i:i + batch])]
            scores = metrics.score(modality, preds, [r["answer"] for r in rows])
            results.append({"modality": modality, "model": adapter.ref if adapter else f"base:{base_id}",
                            "samples": len(rows), **scores,
                            "example": {"id": rows[0]["id"], "prediction": preds[0], "reference": rows[0]["answer"]}})
    return results


def table(results: list[dict]) -> str:
    columns = ["modality", "model", "samples", "accuracy", "rouge_l", "bleu4", "ingredient_f1",
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
        scores = {k: v for k, v in r.items() if k not in ("modality", "model", "example")}
        manifest.metrics = {**manifest.metrics, "eval": {**scores, "report": store.url(f"{key}.md")}}
        store.write_json(f"{manifest.key}/manifest.json", asdict(manifest))
    return store.url(f"{key}.md")

