"""Tenant adapter uploads: real PEFT adapters on the tiny base, and every way to get one wrong."""

import gzip
import io
import json
import pickle
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddft.adapters import registry
from ddft.adapters.archive import unpack
from ddft.adapters.upload import publish_upload, validate_upload
from ddft.errors import DdftError
from ddft.models.info import LORA_TARGETS_FILE, base_spec
from ddft.models.load import ensure_base
from ddft.store import Store
from serve.errors import status_of
from tests.test_engine_hf import lora_folder

CFG, ST = "adapter_config.json", "adapter_model.safetensors"
Q0 = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
LIMITS = dict(max_rank=16, max_bytes=1 << 20)


def _adapter(store, tmp, tag, **lora) -> dict[str, bytes]:
    """A PEFT LoRA saved by save_pretrained, as the upload's {file name: bytes}."""
    folder = lora_folder(store, tmp / tag, **lora)
    return {name: (folder / name).read_bytes() for name in (CFG, ST)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upload")
    store = Store(str(tmp / "base-store"))
    ensure_base(store, "tiny", build="tiny")
    return dict(
        store=store,
        spec=base_spec(store, "tiny"),
        good=_adapter(store, tmp, "good"),
        projector=_adapter(store, tmp, "projector", modules_to_save=["multi_modal_projector"]),
        pattern=_adapter(store, tmp, "pattern", rank_pattern={"v_proj": 4}),
    )


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


def _tensors(files):
    return st_load(files[ST])


def _with(files, tensors=None, **cfg):
    out = dict(files)
    if tensors is not None:
        out[ST] = st_save(tensors)
    if cfg:
        out[CFG] = json.dumps({**json.loads(files[CFG]), **cfg}).encode()
    return out


def _renamed(files, old, new):
    return _with(files, {k.replace(old, new): v for k, v in _tensors(files).items()})


def _publish(store, files, tiny, name="mine", modality="text", **limits):
    return publish_upload(
        store, files, tenant="acme", name=name, modality=modality, spec=tiny["spec"], **{**LIMITS, **limits}
    )


def _refused(store, files, tiny, status, error, **kw) -> DdftError:
    with pytest.raises(DdftError) as err:
        _publish(store, files, tiny, **kw)
    assert (status_of(err.value), err.value.code) == (status, error), err.value.detail
    assert not [k for k in store.list("adapters") if k.startswith("adapters/tenant-")]
    return err.value


def test_base_spec_names_lm_linears_as_peft_saves_them(tiny):
    spec = tiny["spec"]
    assert spec.id == "tiny" and spec.origin == "build:tiny" and len(spec.fingerprint) == 64
    assert spec.modules["model.language_model.layers.0.self_attn.k_proj"] == (64, 32)
    assert all(".language_model." in m for m in spec.modules)  # no vision tower, projector or lm_head
    for key in _tensors(tiny["good"]):
        assert key.split(".lora_")[0].removeprefix("base_model.model.") in spec.modules


def test_the_bases_lora_targets_are_written_when_it_is_saved_and_read_without_torch(tiny, tmp_path):
    """The gateway checks uploads against the base's Linear shapes: saved with the base (no torch to
    read them); a base saved before that file existed gets it once, from its config alone."""
    store = tiny["store"]
    written = store.read_json(f"models/tiny/{LORA_TARGETS_FILE}")
    assert {k: tuple(v) for k, v in written.items()} == tiny["spec"].modules
    code = (
        "import sys; from ddft.store import Store; from ddft.models.info import base_spec; "
        f"spec = base_spec(Store({store.uri!r}), 'tiny'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(len(spec.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and int(out.stdout) == len(written), out.stderr[-2000:]
    old = Store(str(tmp_path / "old"))  # the same base, saved without the file
    for key in store.list("models/tiny"):
        if not key.endswith(LORA_TARGETS_FILE):
            old.write_bytes(key, store.read_bytes(key))
    assert base_spec(old, "tiny").modules == tiny["spec"].modules  # the meta-device skeleton's
    assert old.exists(f"models/tiny/{LORA_TARGETS_FILE}")


def test_good_upload_publishes_versions_and_delete_removes_them(tiny, store, tmp_path):
    m1 = _publish(store, tiny["good"], tiny)
    m2 = _publish(store, tiny["good"], tiny)
    assert (m1.ref, m2.ref) == ("tenant-acme/mine/v1", "tenant-acme/mine/v2")
    assert (m1.source, m1.owner, m1.base_model_id, m1.rank) == ("uploaded", "tenant-acme", "tiny", 8)
    assert m1.base_fingerprint == tiny["spec"].fingerprint and m1.modules_to_save == []
    assert registry.resolve(store, "text", tenant="acme", explicit="mine") == m2
    registry.download(store, m1, tmp_path / "back")  # the weights' hash matches the manifest
    assert (tmp_path / "back" / ST).read_bytes() == tiny["good"][ST]

    assert registry.delete(store, "tenant-acme", "mine", 1) == [1]
    assert registry.versions(store, "tenant-acme", "mine") == [2]
    assert registry.delete(store, "tenant-acme", "mine", 1) == []
    assert registry.delete(store, "tenant-acme", "mine") == [2]
    assert registry.delete(store, "tenant-acme", "mine") == []
    assert store.list("adapters/tenant-acme") == []


def test_rank_pattern_and_fingerprint_are_honoured(tiny):
    cfg = validate_upload(tiny["pattern"], tiny["spec"], **LIMITS)
    assert cfg["rank_pattern"] == {"v_proj": 4}
    assert list(_tensors(tiny["pattern"])[Q0.replace("q_proj", "v_proj") + ".lora_A.weight"].shape) == [4, 64]
    bad = _with(tiny["pattern"], rank_pattern={"v_proj": 8})
    with pytest.raises(DdftError) as err:
        validate_upload(bad, tiny["spec"], **LIMITS)
    assert err.value.code == "wrong_shape"
    other = _with(
        tiny["good"], base_model_name_or_path="someone/renamed", ddft_base_fingerprint=tiny["spec"].fingerprint
    )
    validate_upload(other, tiny["spec"], **LIMITS)  # same weights under another name
    validate_upload(_with(tiny["good"], base_model_name_or_path="build:tiny"), tiny["spec"], **LIMITS)


def test_pickles_are_refused_unopened(tiny, store, tmp_path):
    buf = io.BytesIO()
    torch.save(_tensors(tiny["good"]), buf)
    _refused(store, {**tiny["good"], "adapter_model.bin": buf.getvalue()}, tiny, 415, "pickle_refused")

    class Trap:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    only_pickle = {CFG: tiny["good"][CFG], "adapter_model.PT": pickle.dumps(Trap())}
    _refused(store, only_pickle, tiny, 415, "pickle_refused")
    assert not (tmp_path / "pwned").exists()


def _replaced(good, key, fn):
    t = _tensors(good)
    t[key] = fn(t[key]).contiguous()
    return _with(good, t)


A0, B0 = f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight"
BAD = {  # case: (status, error, limits, (good, projector) -> files)
    "missing_safetensors": (422, "missing_file", {}, lambda g, p: {CFG: g[CFG]}),
    "missing_config": (422, "missing_file", {}, lambda g, p: {ST: g[ST]}),
    "oversized": (413, "too_large", {"max_bytes": 1000}, lambda g, p: g),
    "config_not_json": (422, "bad_config", {}, lambda g, p: {**g, CFG: b"{nope"}),
    "not_lora": (422, "bad_config", {}, lambda g, p: _with(g, peft_type="IA3")),
    "rank_not_int": (422, "bad_config", {}, lambda g, p: _with(g, r="8")),
    "dora": (422, "unsupported_lora", {}, lambda g, p: _with(g, use_dora=True)),
    "lora_bias": (422, "unsupported_lora", {}, lambda g, p: _with(g, bias="all")),
    "rank_too_high": (422, "rank_too_high", {"max_rank": 4}, lambda g, p: g),
    "wrong_base": (422, "wrong_base", {}, lambda g, p: _with(g, base_model_name_or_path="someone/other-model")),
    "truncated": (422, "bad_safetensors", {}, lambda g, p: {**g, ST: g[ST][:-10]}),
    "truncated_header": (422, "bad_safetensors", {}, lambda g, p: {**g, ST: g[ST][:20]}),
    "trailing_bytes": (422, "bad_safetensors", {}, lambda g, p: {**g, ST: g[ST] + bytes(8)}),
    "not_safetensors": (422, "bad_safetensors", {}, lambda g, p: {**g, ST: bytes(64)}),
    "modules_to_save": (422, "unknown_module", {}, lambda g, p: p),
    "no_such_layer": (422, "unknown_module", {}, lambda g, p: _renamed(g, "layers.1.", "layers.7.")),
    "vision_tower": (
        422,
        "unknown_module",
        {},
        lambda g, p: _renamed(
            g, "language_model.layers.0.self_attn.q_proj", "image_tower.encoder.layers.0.self_attn.q_proj"
        ),
    ),
    "not_a_lora_key": (
        422,
        "unknown_module",
        {},
        lambda g, p: _with(g, {**_tensors(g), "base_model.model.lm_head.weight": torch.zeros(2, 2)}),
    ),
    "transposed": (422, "wrong_shape", {}, lambda g, p: _replaced(g, A0, lambda x: x.T)),
    "resized": (422, "wrong_shape", {}, lambda g, p: _replaced(g, B0, lambda x: x[:, :4])),
    "float64": (422, "bad_dtype", {}, lambda g, p: _replaced(g, A0, lambda x: x.double())),
    "a_without_b": (
        422,
        "bad_safetensors",
        {},
        lambda g, p: _with(g, {k: v for k, v in _tensors(g).items() if k != B0}),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapters_are_refused_and_leave_nothing(case, tiny, store):
    status, error, limits, make = BAD[case]
    err = _refused(store, make(tiny["good"], tiny["projector"]), tiny, status, error, **limits)
    if case == "wrong_base":
        assert "someone/other-model" in err.detail and "'tiny'" in err.detail
    if case == "no_such_layer":
        assert "layers.7.self_attn" in err.detail and "layers.0.self_attn.q_proj" in err.detail
    if case == "transposed":
        assert A0 in err.detail and "[64, 8]" in err.detail and "[8, 64]" in err.detail


@pytest.mark.parametrize("name", ["../x", "a/b", "%2e%2e", "..", "", "Caps", "x" * 65])
def test_bad_names_and_modality(name, tiny, store):
    _refused(store, tiny["good"], tiny, 400, "bad_name", name=name)
    _refused(store, tiny["good"], tiny, 400, "bad_modality", modality="audio")


# -- archives -----------------------------------------------------------------------------------


def _tar(members, gz=True):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):  # (type, target): a link
                info.type, info.linkname = data
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_and_tar_gz_uploads_publish(tiny, store):
    good = tiny["good"]
    for i, archive in enumerate(
        [_zip(good.items()), _tar([(f"my-adapter/{k}", v) for k, v in good.items()]), _tar(good.items(), gz=False)]
    ):
        files = unpack(archive=archive, content_type="application/octet-stream")
        assert files == good
        assert _publish(store, files, tiny).version == i + 1
    assert unpack(files={"C:\\Users\\me\\adapter_config.json": b"{}", "x/adapter_model.safetensors": b""}) == {
        CFG: b"{}",
        ST: b"",
    }  # multipart: base names only


def _unpack_refused(status, error, **kw):
    with pytest.raises(DdftError) as err:
        unpack(**kw)
    assert (status_of(err.value), err.value.code) == (status, error), err.value.detail


def test_bad_archives(tiny, tmp_path):
    good = list(tiny["good"].items())
    _unpack_refused(422, "bad_archive", archive=_tar(good + [("../evil", b"x")]))
    _unpack_refused(422, "bad_archive", archive=_tar(good + [("/etc/evil", b"x")]))
    _unpack_refused(422, "bad_archive", archive=_zip(good + [("../evil", b"x")]))
    _unpack_refused(422, "bad_archive", archive=_tar(good + [("link", (tarfile.SYMTYPE, "/etc/passwd"))]))
    _unpack_refused(422, "bad_archive", archive=_tar(good + [("hard", (tarfile.LNKTYPE, CFG))]))
    _unpack_refused(422, "bad_archive", archive=_tar([(f"a/b/{k}", v) for k, v in good]))  # too deep
    _unpack_refused(422, "bad_archive", archive=_tar([(f"a/{CFG}", b"{}"), (f"b/{ST}", b"")]))  # two folders
    _unpack_refused(422, "bad_archive", archive=_tar(good)[:200])  # truncated gzip
    _unpack_refused(422, "bad_archive", archive=b"just some bytes", content_type="text/plain")
    _unpack_refused(413, "too_large", archive=_tar(good), max_bytes=1000)
    _unpack_refused(413, "too_large", archive=_zip(good), max_bytes=1000)
    _unpack_refused(413, "too_large", files=dict(good), max_bytes=1000)
    bomb = gzip.compress(b"\0" * (8 << 20))  # 8 MiB of zeros in ~8 KiB: inflation stops at the cap
    assert len(bomb) < 100_000
    _unpack_refused(413, "too_large", archive=bomb, max_bytes=1 << 20)
    zip_bomb = _zip([("adapter_model.safetensors", b"\0" * (8 << 20))])
    _unpack_refused(413, "too_large", archive=zip_bomb, max_bytes=1 << 20)


def test_zip_symlink_member_is_refused(tiny):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(CFG, tiny["good"][CFG])
        link = zipfile.ZipInfo(ST)
        link.external_attr = 0o120777 << 16  # S_IFLNK: what `zip --symlinks` records
        zf.writestr(link, "/etc/passwd")
    _unpack_refused(422, "bad_archive", archive=buf.getvalue())


def test_store_failure_mid_publish_leaves_nothing(tiny, store, monkeypatch):
    from ddft.store import StoreError

    def broken(self, key, obj):
        raise StoreError(f"{key}: disk full")

    monkeypatch.setattr(Store, "create_json", broken)  # the manifest, written last, fails
    with pytest.raises(StoreError, match="disk full"):
        _publish(store, tiny["good"], tiny)
    assert store.list("adapters") == []


@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.integration)])
def test_parallel_uploads_of_one_name_each_get_their_own_version(tiny, kind, tmp_path, request):
    """16 PUTs of one name at once: 16 distinct versions, each holding exactly the weights its
    publish reported (issue 12: several used to share a version, and the others were lost)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    store = Store(str(tmp_path / "store")) if kind == "file" else request.getfixturevalue("s3_store")
    uploads = [_with(tiny["good"], {k: v + i / 64 for k, v in _tensors(tiny["good"]).items()}) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        manifests = list(pool.map(lambda files: _publish(store, files, tiny), uploads))
    assert sorted(m.version for m in manifests) == list(range(1, 17))
    assert registry.versions(store, "tenant-acme", "mine") == list(range(1, 17))
    for files, m in zip(uploads, manifests):
        assert m.weights_sha256 == hashlib.sha256(files[ST]).hexdigest()
        assert store.read_bytes(f"{m.key}/{ST}") == files[ST]
        assert registry.read_manifest(store, "tenant-acme", "mine", m.version) == m
    assert not [k for k in store.list("adapters") if "/.staging/" in k]
    if kind == "file":
        assert not (tmp_path / "store" / "adapters" / "tenant-acme" / "mine" / ".staging").exists()


def test_published_config_spells_out_the_modules(tiny, store):
    """The stored adapter_config names the tensors' modules exactly: PEFT never runs the tenant's
    regexes on a replica, and makes no LoRA layers the upload has no weights for."""
    from ddft.adapters.upload import publish_upload

    files = _with(tiny["pattern"], target_modules=".*", layers_pattern="evil")
    m = publish_upload(
        store, files, tenant="acme", name="exact", modality="text", spec=tiny["spec"], max_rank=64, max_bytes=1 << 24
    )
    cfg = store.read_json(f"{m.key}/adapter_config.json")
    modules = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in _tensors(tiny["pattern"])})
    assert cfg["target_modules"] == modules and cfg["layers_pattern"] is None
    assert cfg["rank_pattern"] == {mod: 4 for mod in modules if mod.endswith("v_proj")}
    assert cfg["base_model_name_or_path"] == "tiny"
