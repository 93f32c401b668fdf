"""Prepare one modality with Ray Data: native files in the store -> tokenized parquet shards.

Layout: datasets/prepared/<modality>/<version>/{part-*.parquet, manifest.json}. The version is
a fingerprint of the inputs (listing sizes and ETags/mtimes, never the bytes) and the settings,
so unchanged input reuses its version. The pipeline streams: each sample's media is read from
the store (file:// or s3://) inside the map, only the sampled frames are decoded, and rows go
straight to parquet. A bad sample becomes a row with an `error` ("reason: detail") and no
payload, so nothing is dropped silently; readers of the shards skip those rows. The manifest is
written last and `latest.json` after it: a version without a manifest does not exist.
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

from ddft.config import JOINT, MODALITIES, DataConfig, TrainConfig
from ddft.data import formats
from ddft.data.media import MediaError, load_image, sample_frames
from ddft.models.load import BaseInfo, ensure_base, local_base_dir
from ddft.prompts import QUESTIONS, encode
from ddft.store import Store, StoreError

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("pixels", pa.binary()),
        ("pixel_shape", pa.list_(pa.int32())),
        ("error", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


class PrepareError(RuntimeError):
    pass


@dataclass(frozen=True)
class Prepared:
    modality: str
    version: str
    key: str  # store key of the version's folder
    counts: dict  # kept samples per split
    skipped: dict  # {"total", "by_reason", "examples"}
    seconds: float
    reused: bool

    def summary(self) -> str:
        kept = sum(self.counts.values())
        return (
            f"{self.modality}: read {kept + self.skipped['total']}, kept {kept} {self.counts}, skipped "
            f"{self.skipped['total']} {self.skipped['by_reason']}, {self.seconds:.1f} s, version "
            f"{self.version}{' (reused)' if self.reused else ''}"
        )


def prepared_key(modality: str, version: str | None = None) -> str:
    return f"datasets/prepared/{modality}" + (f"/{version}" if version else "")


def latest_version(store: Store, modality: str) -> str:
    key = f"{prepared_key(modality)}/latest.json"
    if not store.exists(key):
        raise StoreError(
            f"no prepared {modality} data at {store.url(prepared_key(modality))}: "
            "run `ddft data prepare --config ...` (or `make demo`) first"
        )
    return store.read_json(key)["version"]


def _hash100(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100


def qa_split(pair: formats.QAPair) -> str:
    """The pair's own `split` when its file gives one; else a stable hash decides, by fact: ~10% of
    facts are held out whole (`test`: no phrasing of them is trained on), and of the other facts'
    phrasings ~10% are `val` (in-distribution: the same fact is trained on in other words). A pair
    without a `fact` is a fact of its own."""
    if pair.split:
        return pair.split
    if _hash100("fact:" + (pair.fact or pair[0])) < 10:
        return "test"
    return "val" if pair.fact and _hash100("phrasing:" + pair[0]) < 10 else "train"


def list_samples(store: Store, data: DataConfig, modality: str) -> tuple[list[dict], list[tuple[str, str]], str]:
    """The samples of one modality as plain dicts, the reader's problems, and the raw prefix read."""
    raw = data.raw_prefix.rstrip("/")
    if modality == "image":
        fx = formats.read_foodx(store, f"{raw}/{data.foodx}")
        items = [
            {
                "id": key.rsplit("/", 1)[-1],
                "split": split,
                "media_key": key,
                "spans": None,
                "question": QUESTIONS["image"],
                "answer": name.replace("_", " "),
            }
            for split, rows in sorted(fx.splits.items())
            for key, _label, name in rows
        ]
        return items, fx.problems, f"{raw}/{data.foodx}"
    if modality == "video":
        recipes = formats.read_tasty(store, f"{raw}/{data.tasty}", split_set=data.tasty_split)
        items = [
            {
                "id": r.id,
                "split": r.split or "train",
                "media_key": r.video_key,
                "spans": json.dumps(r.step_spans),
                "question": QUESTIONS["video"],
                "answer": r.text,
            }
            for r in recipes
        ]
        return items, recipes.problems, f"{raw}/{data.tasty}"
    pairs = formats.read_qa(store, f"{raw}/{data.qa}")
    items = [
        {"id": f"qa-{i:06d}", "split": qa_split(pair), "media_key": None, "spans": None, "question": q, "answer": a}
        for i, pair in enumerate(pairs)
        for q, a in [pair]
    ]
    return items, pairs.problems, f"{raw}/{data.qa}"


class _Encode:
    """Ray Data map (an actor: the processor loads once): media from the store, only the
    sampled frames decoded, prompt + answer tokenized with the prompt masked."""

    def __init__(self, store: Store, base_id: str, modality: str, data: DataConfig):
        from transformers import AutoProcessor

        self.store, self.modality, self.data = store, modality, data
        self.processor = AutoProcessor.from_pretrained(local_base_dir(store, base_id))

    def _pixels(self, key: str, spans: str | None) -> np.ndarray:
        raw = self.store.read_bytes(key)
        if self.modality == "image":
            return load_image(raw)
        return sample_frames(
            raw, self.data.frames, strategy=self.data.frame_strategy, spans=json.loads(spans) if spans else None
        )

    def _row(self, item: dict) -> dict:
        pixels = None
        if self.modality != "text":
            pixels = self._pixels(item["media_key"], item["spans"])
        ids = encode(self.processor, self.modality, item["question"], item["answer"], self.data.frames)
        return {
            "input_ids": ids["input_ids"],
            "labels": ids["labels"],
            "pixels": pixels.tobytes() if pixels is not None else None,
            "pixel_shape": list(pixels.shape) if pixels is not None else [],
            "error": "",
        }

    def __call__(self, batch: dict) -> pa.Table:
        rows = []
        for i in range(len(batch["id"])):
            item = {k: batch[k][i] for k in batch}
            try:
                out = self._row(item)
            except MediaError as err:
                out = {"error": str(err)}
            except StoreError as err:
                out = {"error": f"missing_file: {err}"}
            base = {k: item[k] for k in ("id", "split", "question", "answer")}
            rows.append({"input_ids": [], "labels": [], "pixels": None, "pixel_shape": [], **base, **out})
        return pa.Table.from_pylist(rows, schema=SCHEMA)  # plain parquet types: any reader can use them


def _fingerprint(items: list[dict], entries: list, base: BaseInfo, modality: str, data: DataConfig) -> str:
    settings = {"schema": SCHEMA_VERSION, "modality": modality, "base": base.fingerprint}
    if modality == "video":
        settings |= {"frames": data.frames, "strategy": data.frame_strategy}
    blob = json.dumps({"settings": settings, "items": items, "files": entries}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _skip_report(bad: list[tuple[str, str]]) -> dict:
    reasons = Counter(reason.split(":", 1)[0] for _, reason in bad)
    return {
        "total": len(bad),
        "by_reason": dict(reasons.most_common()),
        "examples": [{"id": i, "reason": r[:300]} for i, r in bad[:5]],
    }


def shard_columns(store: Store, key: str, columns=("id", "split", "error")) -> pa.Table:
    """Some columns of a version's shards (column reads: cheap, no pixels)."""
    import pyarrow.dataset as pads

    fs, _ = store.fs_path(key)
    files = [store.fs_path(k)[1] for k in store.list(key) if k.endswith(".parquet")]
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=list(columns))


def good_rows(store: Store, modality: str, version: str, splits, columns) -> list[dict]:
    """The good (error-free) rows of some splits of a version, in file order, as dicts."""
    cols = tuple(dict.fromkeys((*columns, "split", "error")))
    rows = shard_columns(store, prepared_key(modality, version), cols).to_pylist()
    return [r for r in rows if not r["error"] and r["split"] in splits]


def prepare(store: Store, data: DataConfig, base: BaseInfo, modality: str) -> Prepared:
    """Prepare one modality; reuse the existing version when nothing changed."""
    import ray

    t0 = time.time()
    items, problems, raw_prefix = list_samples(store, data, modality)
    if not items:
        raise PrepareError(
            f"{modality}: no samples found under {store.url(raw_prefix)} "
            f"({len(problems)} problems, e.g. {problems[:3]})"
        )
    version = _fingerprint(items, store.entries(raw_prefix), base, modality, data)
    key = prepared_key(modality, version)
    if store.exists(f"{key}/manifest.json"):
        m = store.read_json(f"{key}/manifest.json")
        store.write_json(f"{prepared_key(modality)}/latest.json", {"version": version})
        return Prepared(modality, version, key, m["counts"], m["skipped"], time.time() - t0, True)

    store.delete(key)  # a crashed earlier attempt may have left shards without a manifest
    fs, path = store.fs_path(key)
    (
        ray.data.from_items(items)
        .map_batches(
            _Encode,
            fn_constructor_kwargs=dict(store=store, base_id=base.id, modality=modality, data=data),
            batch_size=data.batch_size,
            batch_format="numpy",
            concurrency=(1, data.workers),
            num_cpus=data.cpus_per_worker,
        )
        .write_parquet(path, filesystem=fs)
    )
    written = shard_columns(store, key).to_pylist()
    failed = [(r["id"], r["error"]) for r in written if r["error"]]
    skipped = _skip_report(problems + failed)
    total = len(items) + len(problems)
    ratio = skipped["total"] / max(total, 1)
    if ratio > data.max_skip_ratio:
        store.delete(key)
        top = ", ".join(f"{r} ({n})" for r, n in skipped["by_reason"].items())
        raise PrepareError(
            f"{modality}: {skipped['total']} of {total} samples are bad ({ratio:.0%} > "
            f"max_skip_ratio {data.max_skip_ratio:.0%}); reasons: {top}; "
            f"examples: {skipped['examples'][:3]}"
        )
    if len(written) != len(items):  # every sample must come out as a row, good or bad
        raise PrepareError(f"{modality}: {len(items)} samples went in, {len(written)} rows came out")
    counts = dict(sorted(Counter(r["split"] for r in written if not r["error"]).items()))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "modality": modality,
        "version": version,
        "input_fingerprint": version,  # the version *is* the fingerprint of inputs + settings
        "base_model": base.id,
        "columns": list(COLUMNS),
        "counts": counts,
        "skipped": skipped,
        "frames": data.frames if modality == "video" else None,
        "frame_strategy": data.frame_strategy if modality == "video" else None,
        "source": store.url(raw_prefix),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_json(f"{key}/manifest.json", manifest)
    store.write_json(f"{prepared_key(modality)}/latest.json", {"version": version})
    return Prepared(modality, version, key, counts, skipped, time.time() - t0, False)


def read_prepared(store: Store, modality: str, version: str | None = None, split: str | None = "train"):
    """The good prepared rows as a Ray Dataset (streaming from the store)."""
    import ray
    from ray.data.expressions import col

    version = version or latest_version(store, modality)
    key = prepared_key(modality, version)
    if not store.exists(f"{key}/manifest.json"):
        raise StoreError(f"prepared {modality} version {version} not found at {store.url(key)}")
    fs, path = store.fs_path(key)
    # Ray Data 2.60's parquet reader V2 starts 32 FooterReader actors (processes) per read: with
    # several jobs reading train and val at once on a small machine that is hundreds of workers
    # started and killed (load average > 100 on 2 cores). Prepared versions are a few shards, which
    # the V1 reader's tasks read on pooled workers.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"]).filter(expr=col("error") == "")
    return ds.filter(expr=col("split") == split) if split else ds


def write_synthetic(store: Store, data: DataConfig) -> None:
    """Write the synthetic kitchen once per settings: rewriting identical files would only
    change their mtimes, and with them every prepared version's fingerprint."""
    from ddft.data.synthetic import write_kitchen

    marker = f"{data.raw_prefix.rstrip('/')}/.synthetic.json"
    settings = data.synthetic.model_dump()
    if store.exists(marker) and store.read_json(marker) == settings:
        return
    write_kitchen(store, data.raw_prefix, **settings)
    store.write_json(marker, settings)


def prepare_all(cfg: TrainConfig) -> list[Prepared]:
    """The data stages of the loop: base in the store, (synthetic) raw data, each modality prepared."""
    store = Store.from_config(cfg.store)
    base = ensure_base(store, cfg.base.id, cfg.base.build, cfg.base.source)
    if cfg.data.synthetic:
        write_synthetic(store, cfg.data)
    modalities = [m for m in MODALITIES if any(j.modality in (m, JOINT) for j in cfg.jobs)]
    done = []
    for m in modalities:
        done.append(prepare(store, cfg.data, base, m))
        log.info("prepared %s", done[-1].summary())
    return done
