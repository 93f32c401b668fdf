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
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ddft.config import JOINT, MODALITIES, DataConfig, TrainConfig
from ddft.data import formats
from ddft.data.media import MediaError, load_image, sample_frames, uniform_indices
from ddft.data.readers.common import DataError
from ddft.models.load import BaseInfo, ensure_base, local_base_dir
from ddft.prompts import QUESTIONS, encode
from ddft.store import Store, StoreError

log = logging.getLogger(__name__)
SCHEMA_VERSION = 3
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        # Video: the recipe's ingredients with every part the source gives (JSON list of
        # {name, quantity, unit, note, alt_quantity, alt_unit}); the answer text keeps fewer.
        ("ingredients", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("pixels", pa.binary()),
        ("pixel_shape", pa.list_(pa.int32())),
        ("error", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


class PrepareError(DataError):
    """A modality can't be prepared from its data (too many bad samples, none usable)."""


@dataclass(frozen=True)
class Prepared:
    modality: str
    version: str
    key: str  # store key of the version's folder
    counts: dict  # kept samples per split
    skipped: dict  # bad samples: {"total", "by_reason", "examples"}
    seconds: float
    reused: bool
    excluded: dict  # good samples a rule left out, as `skipped`
    decisions: dict  # changes made inside kept samples, by kind
    layout: str | None  # the source layout the reader found

    def summary(self) -> str:
        kept = sum(self.counts.values())
        parts = [
            f"{self.modality}: read {kept + self.skipped['total']}, kept {kept} {self.counts}, skipped "
            f"{self.skipped['total']} {self.skipped['by_reason']}"
        ]
        if self.excluded["total"]:
            parts.append(f"excluded {self.excluded['total']} {self.excluded['by_reason']}")
        if self.decisions:
            parts.append(f"decisions {self.decisions}")
        if self.layout:
            parts.append(f"layout {self.layout}")
        return ", ".join(parts) + f", {self.seconds:.1f} s, version {self.version}{' (reused)' if self.reused else ''}"


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


@dataclass
class Listing:
    """What a reader found for one modality: the samples, the bad ones (problems), the good ones a
    rule left out (excluded), the changes made inside kept ones (decisions) and the layout."""

    items: list[dict]
    problems: list[tuple[str, str]]
    prefix: str
    excluded: list[tuple[str, str]] = field(default_factory=list)
    decisions: dict = field(default_factory=dict)
    layout: str | None = None


def list_samples(store: Store, data: DataConfig, modality: str) -> Listing:
    """The samples of one modality as plain dicts, with what the reader left out and why."""
    raw = data.raw_prefix.rstrip("/")
    if modality == "image":
        fx = formats.read_foodx(store, f"{raw}/{data.foodx}")
        items = [
            _item(key.rsplit("/", 1)[-1], split, QUESTIONS["image"], name.replace("_", " "), key)
            for split, rows in sorted(fx.splits.items())
            for key, _label, name in rows
        ]
        return Listing(items, fx.problems, f"{raw}/{data.foodx}", layout=fx.layout)
    if modality == "video":
        recipes = formats.read_tasty(
            store, f"{raw}/{data.tasty}", split_set=data.tasty_split, unlisted=data.tasty_unlisted
        )
        items = [
            _item(
                r.id,
                r.split,
                QUESTIONS["video"],
                r.text,
                r.video_key,
                spans=json.dumps(r.step_spans),
                ingredients=json.dumps([i.full_dict() for i in r.ingredients]),
            )
            for r in recipes
        ]
        items += [clip for r in recipes if r.split == "train" for clip in step_clips(r, data.step_clips)]
        return Listing(
            items, recipes.problems, f"{raw}/{data.tasty}", recipes.excluded, dict(recipes.decisions), recipes.layout
        )
    pairs = formats.read_qa(store, f"{raw}/{data.qa}")
    items = [_item(f"qa-{i:06d}", qa_split(pair), pair[0], pair[1]) for i, pair in enumerate(pairs)]
    return Listing(items, pairs.problems, f"{raw}/{data.qa}")


def step_clips(recipe, count: int) -> list[dict]:
    """Up to `count` annotated steps of a training recipe (evenly over them) as samples of their
    own: the step's frames (strategy "span") -> the step's sentence. A clip shows all its answer
    says; at the budgets `make bench-video-read` measured they did not make the adapter read sooner."""
    shown = [k for k, span in enumerate(recipe.step_spans) if span]
    picked = sorted({shown[i] for i in uniform_indices(len(shown), count)}) if shown and count else []
    return [
        _item(
            f"{recipe.id}#step{k + 1}",
            recipe.split,
            QUESTIONS["video_step"],
            recipe.steps[k],
            recipe.video_key,
            spans=json.dumps([recipe.step_spans[k]]),
            strategy="span",
        )
        for k in picked
    ]


def _item(id_, split, question, answer, media_key=None, spans=None, ingredients="", strategy="") -> dict:
    # "" rather than None: Ray Data hands an all-None column to a numpy batch as float NaNs.
    return {
        "id": id_,
        "split": split,
        "media_key": media_key,
        "spans": spans,
        "strategy": strategy,  # frame sampling of this sample: "" for the data config's
        "ingredients": ingredients,
        "question": question,
        "answer": answer,
    }


class _Encode:
    """Ray Data map (an actor: the processor loads once): media from the store, only the
    sampled frames decoded, prompt + answer tokenized with the prompt masked."""

    def __init__(self, store: Store, base_id: str, modality: str, data: DataConfig):
        from transformers import AutoProcessor

        self.store, self.modality, self.data = store, modality, data
        self.processor = AutoProcessor.from_pretrained(local_base_dir(store, base_id))

    def _pixels(self, key: str, spans: str | None, strategy: str) -> np.ndarray:
        raw = self.store.read_bytes(key)
        if self.modality == "image":
            return load_image(raw)
        return sample_frames(
            raw,
            self.data.frames,
            strategy=strategy or self.data.frame_strategy,
            spans=json.loads(spans) if spans else None,
        )

    def _row(self, item: dict) -> dict:
        pixels = None
        if self.modality != "text":
            pixels = self._pixels(item["media_key"], item["spans"], item["strategy"])
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
            base["ingredients"] = str(item["ingredients"]) or None
            rows.append({"input_ids": [], "labels": [], "pixels": None, "pixel_shape": [], **base, **out})
        return pa.Table.from_pylist(rows, schema=SCHEMA)  # plain parquet types: any reader can use them


def _fingerprint(items: list[dict], entries: list, base: BaseInfo, modality: str, data: DataConfig) -> str:
    settings = {"schema": SCHEMA_VERSION, "modality": modality, "base": base.fingerprint}
    if modality == "video":
        settings |= {"frames": data.frames, "strategy": data.frame_strategy, "step_clips": data.step_clips}
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


def _gate(modality: str, skipped: dict, kept: int, data: DataConfig, excluded: dict) -> None:
    """Fail on data that is mostly bad or has nothing usable, whether the version is new or reused."""
    total = kept + skipped["total"]
    top = ", ".join(f"{r} ({n})" for r, n in skipped["by_reason"].items()) or "none"
    if kept == 0:
        left = f"; {excluded['total']} more left out by rule: {excluded['by_reason']}" if excluded["total"] else ""
        raise PrepareError(
            f"{modality}: no usable samples ({total} read, all bad){left}; reasons: {top}; "
            f"examples: {skipped['examples'][:3] + excluded['examples'][:2]}"
        )
    ratio = skipped["total"] / max(total, 1)
    if ratio > data.max_skip_ratio:
        raise PrepareError(
            f"{modality}: {skipped['total']} of {total} samples are bad ({ratio:.0%} > max_skip_ratio "
            f"{data.max_skip_ratio:.0%}); reasons: {top}; examples: {skipped['examples'][:3]}; fix the data, or "
            "raise data.max_skip_ratio to train on the rest"
        )


def prepare(store: Store, data: DataConfig, base: BaseInfo, modality: str) -> Prepared:
    """Prepare one modality; reuse the existing version when nothing changed (the skip-ratio gate
    is applied either way: it is a setting, not part of the data)."""
    import ray

    t0 = time.time()
    found = list_samples(store, data, modality)
    excluded = _skip_report(found.excluded)
    if not found.items:
        _gate(modality, _skip_report(found.problems), 0, data, excluded)
    version = _fingerprint(found.items, store.entries(found.prefix), base, modality, data)
    key = prepared_key(modality, version)

    def done(m: dict, reused: bool) -> Prepared:
        store.write_json(f"{prepared_key(modality)}/latest.json", {"version": version})
        return Prepared(
            modality, version, key, m["counts"], m["skipped"], time.time() - t0, reused,
            m.get("excluded", excluded), m.get("decisions", {}), m.get("layout"),
        )  # fmt: skip

    if store.exists(f"{key}/manifest.json"):
        m = store.read_json(f"{key}/manifest.json")
        _gate(modality, m["skipped"], sum(m["counts"].values()), data, m.get("excluded", excluded))
        return done(m, True)

    store.delete(key)  # a crashed earlier attempt may have left shards without a manifest
    fs, path = store.fs_path(key)
    (
        ray.data.from_items(found.items)
        .map_batches(
            _Encode,
            fn_constructor_kwargs=dict(store=store, base_id=base.id, modality=modality, data=data),
            batch_size=data.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=data.workers),  # concurrency= is deprecated
            num_cpus=data.cpus_per_worker,
        )
        .write_parquet(path, filesystem=fs)
    )
    written = shard_columns(store, key).to_pylist()
    if len(written) != len(found.items):  # every sample must come out as a row, good or bad
        store.delete(key)
        raise PrepareError(f"{modality}: {len(found.items)} samples went in, {len(written)} rows came out")
    failed = [(r["id"], r["error"]) for r in written if r["error"]]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "modality": modality,
        "version": version,
        "input_fingerprint": version,  # the version *is* the fingerprint of inputs + settings
        "base_model": base.id,
        "columns": list(COLUMNS),
        "counts": dict(sorted(Counter(r["split"] for r in written if not r["error"]).items())),
        "skipped": _skip_report(found.problems + failed),
        "excluded": excluded,
        "decisions": dict(sorted(found.decisions.items())),
        "layout": found.layout,
        "frames": data.frames if modality == "video" else None,
        "frame_strategy": data.frame_strategy if modality == "video" else None,
        "source": store.url(found.prefix),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        _gate(modality, manifest["skipped"], sum(manifest["counts"].values()), data, excluded)
    except PrepareError:
        store.delete(key)  # nothing half-made stays behind
        raise
    store.write_json(f"{key}/manifest.json", manifest)
    return done(manifest, False)


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
    from ddft.data.synthetic import KITCHEN_FOLDERS, KITCHEN_LAYOUT, write_kitchen

    raw = data.raw_prefix.rstrip("/")
    marker = f"{raw}/.synthetic.json"
    settings = {**data.synthetic.model_dump(), "layout": KITCHEN_LAYOUT}
    if store.exists(marker):
        if store.read_json(marker) == settings:
            return
        for folder in KITCHEN_FOLDERS:  # ours (the marker says so): an older kitchen's files go
            store.delete(f"{raw}/{folder}")
    write_kitchen(store, data.raw_prefix, **data.synthetic.model_dump())
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
