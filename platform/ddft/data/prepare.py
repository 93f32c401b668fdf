"""Prepare one modality with Ray Data: native files in the store -> tokenized parquet shards.

Layout: datasets/prepared/<modality>/<version>/{part-*.parquet, manifest.json}, version = a
fingerprint of the inputs and settings, so unchanged input reuses its version. The manifest is
written last and `latest.json` after it: a version without a manifest does not exist.
Each row: id, split, question, answer, input_ids, labels (prompt masked to -100),
pixels (raw uint8 bytes, null for text) and pixel_shape.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ddft.config import DataConfig, PipelineConfig
from ddft.data import formats
from ddft.data.media import MediaError, load_image, sample_frames
from ddft.models.load import BaseInfo, ensure_base, local_base_dir
from ddft.prompts import QUESTIONS, encode
from ddft.store import Store, StoreError

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("question", pa.string()),
                    ("answer", pa.string()), ("input_ids", pa.list_(pa.int32())),
                    ("labels", pa.list_(pa.int32())), ("pixels", pa.binary()),
                    ("pixel_shape", pa.list_(pa.int32())), ("error", pa.string())])
COLUMNS = tuple(SCHEMA.names[:-1])


class PrepareError(RuntimeError):
    pass


@dataclass(frozen=True)
class Prepared:
    modality: str
    version: str
    key: str  # store key of the version's folder
    counts: dict
    skipped: dict
    seconds: float
    reused: bool


def prepared_key(modality: str, version: str | None = None) -> str:
    return f"datasets/prepared/{modality}" + (f"/{version}" if version else "")


def latest_version(store: Store, modality: str) -> str:
    key = f"{prepared_key(modality)}/latest.json"
    if not store.exists(key):
        raise StoreError(f"no prepared {modality} data at {store.url(prepared_key(modality))}: "
                         "run `ddft data prepare --config ...` (or `make demo`) first")
    return store.read_json(key)["version"]


def _qa_split(question: str) -> str:
    # QA has no official split: hold out a stable ~10% by hash of the question.
    return "val" if int(hashlib.sha256(question.encode()).hexdigest(), 16) % 10 == 0 else "train"


def list_samples(store: Store, data: DataConfig, modality: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """The samples of one modality as plain dicts, and the reader's problems (where, reason)."""
    raw = data.raw_prefix.rstrip("/")
    if modality == "image":
        fx = formats.read_foodx(store, f"{raw}/{data.foodx}")
        items = [{"id": key.rsplit("/", 1)[-1], "split": split, "media_key": key,
                  "question": QUESTIONS["image"], "answer": name.replace("_", " ")}
                 for split, rows in sorted(fx.splits.items()) for key, _label, name in rows]
        return items, fx.problems
    if modality == "video":
        recipes = formats.read_tasty(store, f"{raw}/{data.tasty}", split_set=data.tasty_split)
        items = [{"id": r.id, "split": r.split or "train", "media_key": r.video_key,
                  "question": QUESTIONS["video"], "answer": r.text} for r in recipes]
        return items, recipes.problems
    pairs = formats.read_qa(store, f"{raw}/{data.qa}")
    items = [{"id": f"qa-{i:06d}", "split": _qa_split(q), "media_key": None, "question": q, "answer": a}
             for i, (q, a) in enumerate(pairs)]
    return items, pairs.problems


class _Encode:
    """Ray Data map: read media from the store, decode only what is needed, tokenize."""

    def __init__(self, store: Store, base_id: str, modality: str, frames: int):
        from transformers import AutoProcessor

        self.store, self.modality, self.frames = store, modality, frames
        self.processor = AutoProcessor.from_pretrained(local_base_dir(store, base_id))

    def _pixels(self, key: str) -> np.ndarray:
        data = self.store.read_bytes(key)
        return sample_frames(data, self.frames) if self.modality == "video" else load_image(data)

    def __call__(self, batch: dict) -> dict:
        out = {c: [] for c in (*COLUMNS, "error")}
        for i in range(len(batch["id"])):
            row = {k: batch[k][i] for k in ("id", "split", "question", "answer")}
            pixels, error = None, ""
            try:
                if self.modality != "text":
                    pixels = self._pixels(batch["media_key"][i])
                ids = encode(self.processor, self.modality, row["question"], row["answer"], self.frames)
            except MediaError as err:
                error, ids = f"{err.reason}: {err}", {"input_ids": [], "labels": []}
            except StoreError as err:
                error, ids = f"missing_file: {err}", {"input_ids": [], "labels": []}
            for k, v in row.items():
                out[k].append(v)
            out["input_ids"].append(ids["input_ids"])
            out["labels"].append(ids["labels"])
            out["pixels"].append(pixels.tobytes() if pixels is not None else None)
            out["pixel_shape"].append(list(pixels.shape) if pixels is not None else [])
            out["error"].append(error)
        return pa.table(out, schema=SCHEMA)  # plain parquet types: any reader can use the shards


def _fingerprint(items: list[dict], store: Store, base: BaseInfo, modality: str, data: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"schema": SCHEMA_VERSION, "modality": modality, "frames": data.frames,
                         "base": base.fingerprint, "items": items}, sort_keys=True).encode())
    for it in items:  # media content too: a replaced file must make a new version
        if it["media_key"]:
            h.update(hashlib.sha256(store.read_bytes(it["media_key"])).digest())
    return h.hexdigest()[:16]


def prepare(store: Store, data: DataConfig, base: BaseInfo, modality: str) -> Prepared:
    """Prepare one modality; reuse the existing version when nothing changed."""
    import ray

    t0 = time.time()
    items, problems = list_samples(store, data, modality)
    if not items:
        raise PrepareError(f"{modality}: no samples found under {store.url(data.raw_prefix)} "
                           f"({len(problems)} problems: {problems[:3]})")
    version = _fingerprint(items, store, base, modality, data)
    key = prepared_key(modality, version)
    if store.exists(f"{key}/manifest.json"):
        m = store.read_json(f"{key}/manifest.json")
        store.write_json(f"{prepared_key(modality)}/latest.json", {"version": version})
        return Prepared(modality, version, key, m["counts"], m["skipped"], time.time() - t0, True)

    ds = ray.data.from_items(items).map_batches(
        _Encode, fn_constructor_kwargs=dict(store=store, base_id=base.id, modality=modality,
                                            frames=data.frames),
        batch_size=8, batch_format="numpy", concurrency=1, num_cpus=0.5).materialize()
    failed = ds.filter(lambda r: bool(r["error"])).select_columns(["id", "error"]).take_all()
    skipped = _skip_report(problems + [(r["id"], r["error"]) for r in failed])
    total = len(items) + len(problems)
    ratio = skipped["total"] / max(total, 1)
    if ratio > data.max_skip_ratio:
        top = ", ".join(f"{r} ({n})" for r, n in skipped["by_reason"].items())
        raise PrepareError(f"{modality}: {skipped['total']} of {total} samples are bad ({ratio:.0%} > "
                           f"max_skip_ratio {data.max_skip_ratio:.0%}); reasons: {top}; "
                           f"examples: {skipped['examples'][:3]}")
    kept = ds.filter(lambda r: not r["error"]).drop_columns(["error"])
    fs, path = store.fs_path(key)
    store.delete(key)  # a crashed earlier attempt may have left shards without a manifest
    kept.write_parquet(path, filesystem=fs)
    counts = dict(Counter(r["split"] for r in kept.select_columns(["split"]).take_all()))
    manifest = {"schema_version": SCHEMA_VERSION, "modality": modality, "version": version,
                "base_model": base.id, "frames": data.frames if modality == "video" else None,
                "columns": list(COLUMNS), "counts": counts, "skipped": skipped,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_json(f"{key}/manifest.json", manifest)
    store.write_json(f"{prepared_key(modality)}/latest.json", {"version": version})
    seconds = time.time() - t0
    log.info("%s: read %d, kept %d, skipped %d, %.1f s", modality, total, sum(counts.values()),
             skipped["total"], seconds)
    return Prepared(modality, version, key, counts, skipped, seconds, False)


def _skip_report(bad: list[tuple[str, str]]) -> dict:
    reasons = Counter(reason.split(":", 1)[0] for _, reason in bad)
    return {"total": len(bad), "by_reason": dict(reasons.most_common()),
            "examples": [{"id": i, "reason": r[:300]} for i, r in bad[:5]]}


def read_prepared(store: Store, modality: str, version: str | None = None, split: str | None = "train"):
    """The prepared rows as a Ray Dataset (streaming from the store)."""
    import ray

    version = version or latest_version(store, modality)
    key = prepared_key(modality, version)
    if not store.exists(f"{key}/manifest.json"):
        raise StoreError(f"prepared {modality} version {version} not found at {store.url(key)}")
    fs, path = store.fs_path(key)
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
    return ds.filter(lambda r: r["split"] == split) if split else ds


def prepare_all(cfg: PipelineConfig) -> list[Prepared]:
    """The data stages of the loop: base in the store, (synthetic) raw data, each modality prepared."""
    store = Store.from_config(cfg.store)
    base = ensure_base(store, cfg.base.id, cfg.base.build, cfg.base.source)
    if cfg.data.synthetic:
        from ddft.data.synthetic import write_kitchen

        write_kitchen(store, cfg.data.raw_prefix, **cfg.data.synthetic.model_dump())
    modalities = list(dict.fromkeys(j.modality for j in cfg.jobs))
    return [prepare(store, cfg.data, base, m) for m in modalities]
