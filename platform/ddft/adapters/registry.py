"""Adapter registry: adapters/<owner>/<name>/v<N>/ holding PEFT files + manifest.json.

Publishing is atomic and linearizable: files go to a staging prefix and are validated; the
version number is taken by a conditional create of v<N>/.claim (one winner per N, however many
publish at once), the files are copied to v<N>, and the manifest is written last; a version
without a manifest does not exist. Weights are
safetensors only: pickle formats are refused, never loaded. After publishing, a manifest changes
only through record_metrics (scores merged into its metrics, e.g. by `ddft eval`).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ddft.adapters.files import CONFIG, PICKLE_SUFFIXES, REQUIRED, WEIGHTS, parse_safetensors
from ddft.adapters.ref import PLATFORM_OWNER, AdapterRef, checked_name, tenant_owner, visible_owners
from ddft.errors import Conflict, Invalid, NotFound
from ddft.models.info import BaseInfo
from ddft.store import Store, StoreError

__all__ = ["PLATFORM_OWNER", "AdapterRef", "tenant_owner", "visible_owners"]  # the names' one home is ref.py


class AdapterError(Conflict, ValueError):
    """An adapter that can't be used here: made for another base, or beyond what an engine serves."""

    default_code = "adapter_unusable"


@dataclass
class Manifest:
    name: str
    owner: str
    version: int
    modality: str
    base_model_id: str
    base_fingerprint: str
    rank: int
    alpha: int
    target_modules: str | list[str]
    weights_sha256: str
    source: str  # "trained" or "uploaded"
    created_at: str = ""
    metrics: dict = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    # how its videos were sampled in training (data.frames, data.frame_strategy), so serving samples
    # them the same way; None: not a video adapter, or not known (an upload): the serving default
    frames: int | None = None
    frame_strategy: str | None = None

    @property
    def key(self) -> str:
        return f"{adapter_prefix(self.owner, self.name)}/v{self.version}"

    @property
    def ref(self) -> str:  # how responses and /v1/models name it
        return f"{self.owner}/{self.name}/v{self.version}"


def owner_prefix(owner: str) -> str:
    return f"adapters/{checked_name('owner', owner)}"


def adapter_prefix(owner: str, name: str) -> str:
    return f"{owner_prefix(owner)}/{checked_name('name', name)}"


def _invalid(detail: str) -> Invalid:
    return Invalid(detail, "invalid_adapter")


def read_dir(local_dir: Path) -> dict[str, bytes]:
    """A PEFT folder's adapter files (and README.md), by name; pickles are refused, never read."""
    names = {p.name for p in Path(local_dir).iterdir() if p.is_file()}
    _refuse_pickles(names)
    return {n: (Path(local_dir) / n).read_bytes() for n in (*REQUIRED, "README.md") if n in names}


def _refuse_pickles(names) -> None:
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise _invalid(
            f"refusing pickle files {pickles}: adapters must be safetensors only "
            "(save with save_pretrained(..., safe_serialization=True))"
        )


def validate_files(files: dict[str, bytes]) -> dict:
    """Check an adapter's files without executing anything in them; return adapter_config. The one
    check every published adapter passes, trained or uploaded (uploads are checked against the base
    before this, by adapters/upload.py)."""
    _refuse_pickles(files)
    missing = [n for n in REQUIRED if n not in files]
    if missing:
        raise _invalid(f"adapter folder lacks {missing}; a PEFT LoRA folder has {list(REQUIRED)}")
    try:
        cfg = json.loads(files[CONFIG])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _invalid(f"adapter_config.json is not valid JSON: {err}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise _invalid(
            f"peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; only LORA adapters are served"
        )
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise _invalid(f"adapter_config.json r={cfg.get('r')!r}; it must be a positive integer")
    try:
        parse_safetensors(files[WEIGHTS])
    except Invalid as err:  # refused here as the adapter, whatever part of it is broken
        raise _invalid(err.detail) from None
    return cfg


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions(store: Store, owner: str, name: str) -> list[int]:
    """Published versions (those with a manifest), ascending."""
    return sorted(v for v, what in _markers(store, owner, name) if what == "manifest.json")


def _markers(store: Store, owner: str, name: str) -> set[tuple[int, str]]:
    """(version, "manifest.json" or ".claim") for every version marker under the adapter."""
    prefix = adapter_prefix(owner, name)
    return {
        (int(m.group(1)), m.group(2))
        for key in store.list(prefix + "/")  # the folder only: never adapters/<owner>/<name>2/...
        if (m := re.fullmatch(rf"{re.escape(prefix)}/v(\d+)/(manifest\.json|\.claim)", key))
    }


MAX_CLAIM_TRIES = 100


def _claim_version(store: Store, owner: str, name: str, token: str) -> int:
    """The next version number, taken by a conditional create of v<N>/.claim: of any number of
    concurrent publishers exactly one wins each N, and the others move on to N+1."""
    prefix = adapter_prefix(owner, name)
    for _ in range(MAX_CLAIM_TRIES):
        version = max((v for v, _ in _markers(store, owner, name)), default=0) + 1
        if store.create_bytes(f"{prefix}/v{version}/.claim", token.encode()):
            return version
    raise Conflict(
        f"{owner}/{name}: {MAX_CLAIM_TRIES} concurrent publishes took every version this one tried; publish again",
        "publish_contended",
    )


def read_manifest(store: Store, owner: str, name: str, version: int | None = None) -> Manifest | None:
    if version is None:
        vs = versions(store, owner, name)
        if not vs:
            return None
        version = vs[-1]
    return _read_manifest(store, f"{adapter_prefix(owner, name)}/v{version}/manifest.json")


def _read_manifest(store: Store, key: str) -> Manifest | None:
    """The manifest at key, None when there is none: one read (no existence check first); only a
    read that fails asks whether the key exists, to tell "none" from a store error."""
    try:
        doc = store.read_json(key)
    except StoreError:
        if store.exists(key):
            raise
        return None
    return Manifest(**doc)


# Where list_adapters finds published versions in its one listing: adapters/<owner>/<name>/v<N>/manifest.json
_MANIFEST_KEY = re.compile(r"adapters/([^/]+)/([^/]+)/v(\d+)/manifest\.json")
LIST_READERS = 8  # manifests read at once by list_adapters (boto3's default pool holds 10 connections)


def list_adapters(store: Store, owner: str | None = None) -> list[Manifest]:
    """The newest version of every adapter (of one owner, or all), by (owner, name). One listing of
    the owner's (or every) adapter folder says which versions exist (those with a manifest), so
    only the newest version's manifest of each adapter is read, LIST_READERS at a time."""
    newest: dict[tuple[str, str], int] = {}
    for key in store.list(f"adapters/{owner}/" if owner else "adapters/"):
        if m := _MANIFEST_KEY.fullmatch(key):
            pair = (m.group(1), m.group(2))
            newest[pair] = max(newest.get(pair, 0), int(m.group(3)))
    pairs = sorted(newest)

    def newest_manifest(pair: tuple[str, str]) -> Manifest | None:
        o, n = pair
        found = _read_manifest(store, f"{adapter_prefix(o, n)}/v{newest[pair]}/manifest.json")
        # deleted since the listing: the adapter's versions now (another newest, or none)
        return found if found is not None else read_manifest(store, o, n)

    if len(pairs) <= 1:
        found = [newest_manifest(p) for p in pairs]
    else:
        with ThreadPoolExecutor(min(LIST_READERS, len(pairs)), thread_name_prefix="ddft-list") as pool:
            found = list(pool.map(newest_manifest, pairs))
    return [m for m in found if m is not None]


def publish(
    store: Store,
    adapter: Path | dict[str, bytes],
    *,
    owner: str,
    name: str,
    modality: str,
    base: BaseInfo,
    source: str,
    metrics: dict | None = None,
    frames: int | None = None,
    frame_strategy: str | None = None,
) -> Manifest:
    """Validate and publish an adapter (a PEFT folder, or its files by name) as the next version;
    returns its manifest. `frames`, `frame_strategy`: how the videos it was trained on were sampled
    (a video or joint adapter's; None: no videos, or not known)."""
    files = read_dir(adapter) if isinstance(adapter, Path) else adapter
    cfg = validate_files(files)
    prefix = adapter_prefix(owner, name)
    staging = f"{prefix}/.staging/{uuid.uuid4().hex}"
    version = None
    try:
        for fname in (*REQUIRED, "README.md"):
            if fname in files:
                store.write_bytes(f"{staging}/{fname}", files[fname])
        version = _claim_version(store, owner, name, staging)
        manifest = Manifest(
            name=name,
            owner=owner,
            version=version,
            modality=modality,
            base_model_id=base.id,
            base_fingerprint=base.fingerprint,
            rank=cfg["r"],
            alpha=cfg.get("lora_alpha", cfg["r"]),
            target_modules=cfg.get("target_modules"),
            weights_sha256=_sha256(files[WEIGHTS]),
            source=source,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            metrics=metrics or {},
            modules_to_save=list(cfg.get("modules_to_save") or []),
            frames=frames,
            frame_strategy=frame_strategy,
        )
        store.copy_prefix(staging, manifest.key)
        if not store.create_json(f"{manifest.key}/manifest.json", asdict(manifest)):  # last: now it exists
            version = None  # not ours to clean up
            raise Conflict(
                f"{manifest.ref} was published by someone else while this publish held its claim; publish again",
                "publish_contended",
            )
        version = None  # published: nothing of it to clean up
        return manifest
    finally:
        if version is not None:  # claimed but not published: its files must not stay behind
            store.delete(f"{prefix}/v{version}")
        store.delete(staging)


class _Gone(Exception):
    """record_metrics' version is no longer the one it was given: deleted, or deleted and published again."""


def _same_version(doc: dict | None, manifest: Manifest) -> bool:
    # a deleted version's number can be claimed again: the weights and the time tell the versions apart
    return doc is not None and (doc.get("weights_sha256"), doc.get("created_at")) == (
        manifest.weights_sha256,
        manifest.created_at,
    )


def record_metrics(store: Store, manifest: Manifest, updates: dict) -> Manifest | None:
    """Merge `updates` into a published version's metrics; the one rewrite of a manifest.json besides
    publish's create. Each key of `updates` replaces that key of the metrics, except a dict into a
    dict, which merges one level down: {"eval": {"held-out": scores}} replaces that set's scores and
    keeps the other sets'. One atomic read-change-write (Store.update_json): concurrent recorders lose
    nothing. Returns the manifest as written; None when the version was deleted (or deleted and
    published again) since `manifest` was read: nothing is written, a deleted version never returns."""
    key = f"{manifest.key}/manifest.json"
    current = _read_manifest(store, key)
    if current is None or not _same_version(asdict(current), manifest):
        return None  # before update_json: its lock file would make the deleted version's folder again

    def change(doc: dict | None) -> dict:
        if not _same_version(doc, manifest):
            raise _Gone
        metrics = dict(doc.get("metrics") or {})
        for k, v in updates.items():
            old = metrics.get(k)
            metrics[k] = {**old, **v} if isinstance(old, dict) and isinstance(v, dict) else v
        return {**doc, "metrics": metrics}

    try:
        written = store.update_json(key, change)
    except _Gone:
        return None
    except StoreError:  # S3: a conditional write on a key deleted since it was read fails as a missing key
        if not store.exists(key):
            return None
        raise
    if not store.exists(f"{manifest.key}/{WEIGHTS}"):
        # delete() took the manifest and then the folder between our read and our write (a file store's
        # lock doesn't hold delete back): ours is a manifest without weights; it goes too
        store.delete(key)
        return None
    return Manifest(**written)


def delete(store: Store, owner: str, name: str, version: int | None = None) -> list[int]:
    """Remove one version (or all); returns the versions deleted, [] if there were none."""
    prefix = adapter_prefix(owner, name)
    doomed = versions(store, owner, name)
    if version is not None:
        doomed = [v for v in doomed if v == version]
    for v in doomed:
        store.delete(f"{prefix}/v{v}/manifest.json")  # first: the version stops existing at once
        store.delete(f"{prefix}/v{v}")
    return doomed


def delete_owner(store: Store, owner: str) -> list[str]:
    """Remove every adapter of an owner (a removed tenant's); returns the refs deleted. Manifests
    go first, so each version stops existing at once."""
    prefix = owner_prefix(owner)
    keys = store.list(prefix + "/")
    manifests = sorted(k for k in keys if k.endswith("/manifest.json"))
    for key in manifests:
        store.delete(key)
    store.delete(prefix)
    return [k[len("adapters/") : -len("/manifest.json")] for k in manifests]


def fetch(store: Store, manifest: Manifest) -> dict[str, bytes]:
    """An adapter's files by name, checked against the manifest's hash."""
    files = {fname: store.read_bytes(f"{manifest.key}/{fname}") for fname in REQUIRED}
    if _sha256(files[WEIGHTS]) != manifest.weights_sha256:
        raise AdapterError(f"{manifest.ref}: weights don't match the manifest's sha256; republish it")
    return files


def download(store: Store, manifest: Manifest, local_dir: Path) -> Path:
    """Fetch an adapter's files (checked) into a folder."""
    return write_files(fetch(store, manifest), local_dir)


def write_files(files: dict[str, bytes], local_dir: Path) -> Path:
    """An adapter's files, fetched, written into a folder (for loaders that read one)."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (local_dir / fname).write_bytes(data)
    return local_dir


def check_base(manifest: Manifest, base_id: str, fingerprint: str) -> None:
    """An adapter is served only on the base it was made for (the weights' fingerprint)."""
    if manifest.base_fingerprint != fingerprint:
        raise AdapterError(
            f"adapter {manifest.ref} was made for base {manifest.base_model_id!r} (fingerprint "
            f"{manifest.base_fingerprint[:12]}), but this server serves {base_id!r} (fingerprint "
            f"{fingerprint[:12]}): retrain or re-publish the adapter on this base",
            "adapter_other_base",
        )


def check_modality(manifest: Manifest, modality: str) -> None:
    """An adapter answers requests of its modality (a joint adapter, every modality)."""
    from ddft.config import JOINT

    if manifest.modality not in (modality, JOINT):
        raise Invalid(
            f"adapter {manifest.ref} is for {manifest.modality} requests, this one is {modality}", "adapter_modality"
        )


def resolve(
    store: Store,
    modality: str,
    tenant: str | None = None,
    explicit: str | AdapterRef | None = None,
    base: BaseInfo | None = None,
) -> Manifest | None:
    """The adapter for a request, in DESIGN.md's order; None means the base answers. The one place
    that decides what a caller may use: an explicit reference (str is parsed by AdapterRef.parse)
    among the caller's and the platform's adapters -> the caller's adapter for the modality -> the
    platform's DDFT adapter for it -> the base. NotFound for what the caller can't see (another
    tenant's adapter does not exist for them); with `base`, AdapterError for another base's adapter;
    Invalid for an adapter of another modality."""
    owners = visible_owners(tenant)
    manifest = None
    if explicit is not None:
        ref = explicit if isinstance(explicit, AdapterRef) else AdapterRef.parse(explicit)
        for owner in [ref.owner] if ref.owner else owners:
            if owner in owners and (manifest := read_manifest(store, owner, ref.name, ref.version)):
                break
        if manifest is None:
            raise NotFound(
                f"no adapter {str(ref)!r} for {'tenant ' + tenant if tenant else 'the platform'}; "
                "GET /v1/models lists what is available",
                "unknown_adapter",
            )
    else:
        manifest = next((m for owner in owners if (m := read_manifest(store, owner, modality))), None)
    if manifest is not None:
        if base is not None:
            check_base(manifest, base.id, base.fingerprint)
        check_modality(manifest, modality)
    return manifest
