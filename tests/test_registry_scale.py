"""The registry with many adapters: list_adapters lists the store once and reads only each adapter's
newest published manifest (a version exists when its v<N>/manifest.json does: claims, copies in
progress and staging are not versions); an adapter's listing never reaches its siblings' keys
(adapters/<owner>/name vs name2, name-x). The manifest's two writers: publish (with how a video
adapter's videos were sampled) and record_metrics (merged, atomic, never bringing a deleted version
back). On a file store and on S3 over HTTP (moto)."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from ddft.adapters import registry
from ddft.models.info import BaseInfo
from ddft.store import Store

BASE = BaseInfo("tiny", "f" * 64, "")
# tenant-a1 and tenant-a-x share tenant-a's prefix, and adapter names a1, a10, a100 each other's
OWNERS = ("ddft", "tenant-a", "tenant-a1", "tenant-a-x", "tenant-b")
ADAPTERS = 300


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    if request.param == "file":
        return Store(str(tmp_path / "store"))
    return request.getfixturevalue("s3_store")


def _adapter_files() -> dict[str, bytes]:
    weights = {"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 8))}
    config = b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}'
    return {"adapter_config.json": config, "adapter_model.safetensors": st_save(weights)}


def _populate(store: Store) -> dict[tuple[str, str], int]:
    """ADAPTERS adapters over OWNERS with 1-3 published versions each, in the layout publish makes
    (one adapter published for real, its files copied for the others), plus what is not a version:
    claims of a publish in flight (some with files copied, no manifest yet), staging folders, and
    one adapter that only ever had a claim. Returns {(owner, name): newest published version}."""
    real = registry.publish(
        store, _adapter_files(), owner="tenant-a", name="a0", modality="text", base=BASE, source="uploaded"
    )
    layout = {k[len(real.key) + 1 :]: store.read_bytes(k) for k in store.list(real.key + "/")}
    assert set(layout) == {".claim", "adapter_config.json", "adapter_model.safetensors", "manifest.json"}
    newest = {("tenant-a", "a0"): 1}
    writes: list[tuple[str, bytes]] = []
    for i in range(1, ADAPTERS):
        owner, name = OWNERS[i % len(OWNERS)], f"a{i}"
        newest[owner, name] = top = 1 + i % 3
        prefix = registry.adapter_prefix(owner, name)
        for v in range(1, top + 1):
            manifest = dataclasses.replace(real, owner=owner, name=name, version=v)
            for fname, data in layout.items():
                if fname == "manifest.json":
                    data = (json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True) + "\n").encode()
                writes.append((f"{prefix}/v{v}/{fname}", data))
        if i % 7 == 0:  # the next version claimed, its files copied, its manifest not written yet
            writes += [(f"{prefix}/v{top + 1}/{f}", d) for f, d in layout.items() if f != "manifest.json"]
        if i % 11 == 0:  # a publish still staging its files
            writes += [(f"{prefix}/.staging/0123abcd/{f}", layout[f]) for f in ("adapter_config.json",)]
    writes.append(("adapters/tenant-b/claimed-only/v1/.claim", b"token"))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.write_bytes(*kv), writes))
    return newest


def _counting(monkeypatch, method: str) -> list[str]:
    """Every key (or prefix) Store.<method> is called with, from now on."""
    calls: list[str] = []
    original = getattr(Store, method)

    def counted(self, key="", *args, **kwargs):
        calls.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(Store, method, counted)
    return calls


def test_list_adapters_reads_each_newest_manifest_after_one_listing(store, monkeypatch):
    newest = _populate(store)
    lists, reads = _counting(monkeypatch, "list"), _counting(monkeypatch, "read_bytes")

    everything = registry.list_adapters(store)
    assert [(m.owner, m.name, m.version) for m in everything] == sorted((o, n, v) for (o, n), v in newest.items())
    assert all(m.key == f"{registry.adapter_prefix(m.owner, m.name)}/v{m.version}" for m in everything)
    assert len(lists) == 1
    assert sorted(reads) == sorted(f"{m.key}/manifest.json" for m in everything)  # nothing else read

    for owner in OWNERS:
        lists.clear()
        mine = registry.list_adapters(store, owner)
        assert mine == [m for m in everything if m.owner == owner]  # not tenant-a1's or tenant-a-x's
        assert len(lists) == 1
    assert registry.list_adapters(store, "tenant-nobody") == []

    # what each adapter's own listing (read_manifest: the newest version) says, adapter by adapter
    sample = everything[::25]
    assert [registry.read_manifest(store, m.owner, m.name) for m in sample] == sample


def test_list_adapters_finds_the_version_that_is_newest_now_when_one_goes_meanwhile(store, monkeypatch):
    real = registry.publish(store, _adapter_files(), owner="tenant-a", name="x", modality="text", base=BASE, source="t")
    registry.publish(store, _adapter_files(), owner="tenant-a", name="x", modality="text", base=BASE, source="t")
    original = Store.list

    def list_then_delete(self, prefix=""):  # v2 deleted between the listing and its manifest's read
        keys = original(self, prefix)
        if prefix == "adapters/tenant-a/":
            registry.delete(store, "tenant-a", "x", 2)
        return keys

    monkeypatch.setattr(Store, "list", list_then_delete)
    assert registry.list_adapters(store, "tenant-a") == [real]


def test_an_adapters_listing_never_reaches_its_siblings(store):
    mine = "adapters/tenant-x/name/v1/manifest.json"
    for key in (mine, "adapters/tenant-x/name2/v1/manifest.json", "adapters/tenant-x/name-x/v1/manifest.json"):
        store.write_text(key, "{}")
    store.write_text("adapters/tenant-x/name.txt", "an object beside the folders")
    for prefix in ("adapters/tenant-x/name", "adapters/tenant-x/name/"):
        assert store.list(prefix) == [mine]
        assert [k for k, _, _ in store.entries(prefix)] == [mine]
    assert registry.versions(store, "tenant-x", "name") == [1]
    registry.delete(store, "tenant-x", "name")
    assert store.list("adapters/tenant-x") == [
        "adapters/tenant-x/name-x/v1/manifest.json",
        "adapters/tenant-x/name.txt",
        "adapters/tenant-x/name2/v1/manifest.json",
    ]
    # a final "/" lists the folder: an object of that very name is not in it
    assert store.list("adapters/tenant-x/name.txt") == ["adapters/tenant-x/name.txt"]
    assert store.list("adapters/tenant-x/name.txt/") == []


@pytest.mark.integration
def test_s3_lists_an_adapters_folder_not_every_key_that_starts_like_it(s3_store):
    """S3 matches prefixes by characters: asked for "…/name" it would page through name2's keys too."""
    for name in ("name", "name2", "name-x"):
        s3_store.write_text(f"adapters/tenant-x/{name}/v1/manifest.json", "{}")
    asked: list[str] = []
    s3_store._b.client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", lambda params, **_: asked.append(params["Prefix"])
    )
    assert registry.versions(s3_store, "tenant-x", "name") == [1]
    assert asked == ["root/adapters/tenant-x/name/"]


# -- the manifest's writers: publish and record_metrics ---------------------------------------------------
def _publish(store: Store, name: str = "v", seed: int = 0, **kwargs) -> registry.Manifest:
    files = _adapter_files()
    if seed:  # other weights: another adapter under the same name
        key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
        files["adapter_model.safetensors"] = st_save({key: np.full((2, 8), float(seed))})
    return registry.publish(
        store, files, owner="ddft", name=name, modality="video", base=BASE, source="trained", **kwargs
    )


def test_publish_records_how_the_videos_were_sampled(store):
    video = _publish(store, frames=16, frame_strategy="steps")  # "steps" as trained: serving maps it
    assert (video.frames, video.frame_strategy) == (16, "steps")
    assert registry.read_manifest(store, "ddft", "v") == video
    text = _publish(store, name="t")
    assert (text.frames, text.frame_strategy) == (None, None)


def test_record_metrics_merges_one_level_and_loses_no_concurrent_update(store):
    m = _publish(store, frames=8, frame_strategy="uniform", metrics={"steps": 8, "eval": {"old": {"a": 0.5}}})
    got = registry.record_metrics(store, m, {"eval": {"held-out": {"accuracy": 0.25}}, "note": "x"})
    assert got == registry.read_manifest(store, "ddft", "v")
    assert got.metrics == {"steps": 8, "note": "x", "eval": {"old": {"a": 0.5}, "held-out": {"accuracy": 0.25}}}
    assert dataclasses.replace(got, metrics=m.metrics) == m  # nothing but the metrics changed
    again = registry.record_metrics(store, m, {"eval": {"held-out": {"rouge_l": 0.5}}})  # a set is replaced whole
    assert again.metrics["eval"] == {"old": {"a": 0.5}, "held-out": {"rouge_l": 0.5}}

    with ThreadPoolExecutor(8) as pool:  # concurrent recorders, one set each: every set lands
        list(pool.map(lambda i: registry.record_metrics(store, m, {"eval": {f"set{i}": {"n": i}}}), range(8)))
    evals = registry.read_manifest(store, "ddft", "v").metrics["eval"]
    assert {f"set{i}" for i in range(8)} <= set(evals) and evals["old"] == {"a": 0.5}


def test_record_metrics_never_brings_a_deleted_version_back(store, monkeypatch):
    m = _publish(store)
    registry.delete(store, "ddft", "v")
    assert registry.record_metrics(store, m, {"eval": {}}) is None
    assert registry.versions(store, "ddft", "v") == [] and store.list("adapters/ddft/v/") == []

    # deleted and published again under the same number, other weights: another adapter, not recorded into
    again = _publish(store, seed=3)
    assert again.version == m.version and again.weights_sha256 != m.weights_sha256
    assert registry.record_metrics(store, m, {"eval": {"x": {}}}) is None
    assert registry.read_manifest(store, "ddft", "v") == again

    # delete() runs inside the recorder's read-change-write: S3's conditional write then fails (or retries and
    # finds nothing); a file store's lock doesn't hold delete back, so its write lands and is taken back
    original = Store.update_json

    def deleted_meanwhile(self, key, change):
        def change_after_delete(doc):
            registry.delete(store, "ddft", "v", again.version)
            return change(doc)

        return original(self, key, change_after_delete)

    monkeypatch.setattr(Store, "update_json", deleted_meanwhile)
    assert registry.record_metrics(store, again, {"eval": {"x": {}}}) is None
    assert registry.versions(store, "ddft", "v") == [] and registry.read_manifest(store, "ddft", "v") is None
