"""ddft.store: the same behaviour over file:// and s3:// (a local moto server over HTTP)."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddft.cluster import free_port
from ddft.store import Store, StoreError


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    if request.param == "file":
        return Store(str(tmp_path / "store"))
    return request.getfixturevalue("s3_store")


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_uri_normalization(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Store("store").uri == f"file://{tmp_path}/store"
    assert Store(f"file://{tmp_path}/x/").uri == f"file://{tmp_path}/x"
    s = Store("s3://bucket/a/b/")
    assert (s.uri, s.scheme, s.url("c/d"), s.child("c").uri) == (
        "s3://bucket/a/b",
        "s3",
        "s3://bucket/a/b/c/d",
        "s3://bucket/a/b/c",
    )
    assert Store("s3://bucket").url("k") == "s3://bucket/k"
    assert Store("s3://bucket").local_path("k") is None
    with pytest.raises(StoreError):
        Store("gs://bucket/x")
    with pytest.raises(StoreError):
        Store("s3:///x")


def test_from_config(tmp_path):
    class Cfg:
        uri, endpoint_url, region, access_key_id, secret_access_key = str(tmp_path), None, None, None, None

    s = Store.from_config(Cfg())
    assert (s.scheme, s.local_path("a")) == ("file", tmp_path / "a")


def test_round_trips(store):
    blob = bytes(range(256)) + b"\x00\x00end\x00"
    store.write_bytes("a/blob.bin", blob)
    assert store.read_bytes("a/blob.bin") == blob
    store.write_text("a/t.txt", "héllo\nwörld")
    assert store.read_text("a/t.txt") == "héllo\nwörld"
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    store.write_json("m.json", obj)
    assert store.read_json("m.json") == obj
    assert (
        store.read_text("m.json") == '{\n  "a": {\n    "x": "y"\n  },\n  "b": [\n    1,\n    2.5,\n    null\n  ]\n}\n'
    )
    store.write_bytes("a/blob.bin", b"new")  # overwrite
    assert store.read_bytes("a/blob.bin") == b"new"
    assert store.read_bytes("./a//blob.bin") == b"new"  # keys are normalized


def test_list_exists_delete(store):
    for k in ["runs/j1/a.txt", "runs/j1/sub/b.txt", "runs/j10/c.txt", "runs/x.txt", "top.txt"]:
        store.write_text(k, k)
    assert store.list() == ["runs/j1/a.txt", "runs/j1/sub/b.txt", "runs/j10/c.txt", "runs/x.txt", "top.txt"]
    assert store.list("runs/j1") == ["runs/j1/a.txt", "runs/j1/sub/b.txt"]  # not runs/j10
    assert store.list("runs/j1/") == ["runs/j1/a.txt", "runs/j1/sub/b.txt"]
    assert store.list("top.txt") == ["top.txt"]
    assert store.list("nope") == []
    assert store.exists("runs/j1/a.txt") and store.exists("runs/j1") and store.exists("runs") and store.exists("")
    assert not store.exists("runs/j") and not store.exists("nope") and not store.exists("runs/j1/a")
    store.delete("runs/j1")
    assert store.list("runs") == ["runs/j10/c.txt", "runs/x.txt"]
    assert not store.exists("runs/j1")
    store.delete("top.txt")
    store.delete("never/there")  # missing is fine
    assert store.list() == ["runs/j10/c.txt", "runs/x.txt"]


def test_child(store):
    child = store.child("adapters/ddft")
    child.write_text("v1/manifest.json", "{}")
    assert store.list() == ["adapters/ddft/v1/manifest.json"]
    assert child.url("v1") == store.url("adapters/ddft/v1")
    assert child.list() == ["v1/manifest.json"]


def test_dir_round_trip(store, tmp_path):
    src = tmp_path / "src"
    files = {
        "config.json": b'{"a": 1}',
        "weights.bin": bytes(range(256)) * 4 + b"\x00",
        "sub/deeper/x.txt": b"x",
        "sub/empty.txt": b"",
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    store.upload_dir(src, "models/m1")
    assert store.list("models") == sorted(f"models/m1/{k}" for k in files)
    out = store.download_dir("models/m1", tmp_path / "out")
    assert out == tmp_path / "out" and _tree(out) == files

    store.copy_prefix("models/m1", "models/m2")
    assert store.list("models/m2") == sorted(f"models/m2/{k}" for k in files)
    assert _tree(store.download_dir("models/m2", tmp_path / "out2")) == files
    assert store.list("models/m1") == sorted(f"models/m1/{k}" for k in files)  # source untouched

    with pytest.raises(StoreError, match="not found"):
        store.download_dir("models/none", tmp_path / "out3")
    with pytest.raises(StoreError):
        store.upload_dir(tmp_path / "no-such-dir", "x")


def test_missing_and_bad_keys(store):
    with pytest.raises(StoreError) as e:
        store.read_bytes("adapters/x/v1/manifest.json")
    assert store.url("adapters/x/v1/manifest.json") in str(e.value)
    with pytest.raises(StoreError) as e:
        store.read_json("nope.json")
    assert store.uri + "/nope.json" in str(e.value)
    for bad in ["../escape", "a/../../b", "/etc/passwd"]:
        with pytest.raises(StoreError):
            store.read_bytes(bad)
        with pytest.raises(StoreError):
            store.write_bytes(bad, b"x")


def test_pyarrow_fs(store):
    fs, root = store.pyarrow_fs()
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b\x00c", None]})
    _, path = store.fs_path("datasets/prepared/t/v1/part-0.parquet")
    assert path == f"{root}/datasets/prepared/t/v1/part-0.parquet"
    fs.create_dir(path.rsplit("/", 1)[0])  # Ray Data does this; harmless on both
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert store.list("datasets") == ["datasets/prepared/t/v1/part-0.parquet"]  # really on the store
    assert store.exists("datasets/prepared/t/v1")

    fs2, root2 = pickle.loads(pickle.dumps((fs, root)))
    assert root2 == root and pq.read_table(path, filesystem=fs2).equals(table)


def test_pickle(store):
    store.write_text("k.txt", "v")
    s2 = pickle.loads(pickle.dumps(store))
    assert s2 == store and s2.uri == store.uri and s2.read_text("k.txt") == "v"
    s2.write_text("k2.txt", "w")
    assert store.read_text("k2.txt") == "w"


def test_file_store_is_a_folder(tmp_path):
    s = Store(f"file://{tmp_path}")
    s.write_text("a/b.txt", "x")
    assert (tmp_path / "a/b.txt").read_text() == "x"
    assert s.local_path("a/b.txt") == tmp_path / "a/b.txt"
    assert s.pyarrow_fs()[1] == str(tmp_path)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name != "b.txt"]  # no temp files left behind


@pytest.mark.integration
def test_s3_missing_bucket(s3_endpoint):
    s = Store("s3://no-such-bucket-ddft/root", **s3_endpoint.creds())
    for op in (lambda: s.read_bytes("x"), lambda: s.list(), lambda: s.write_bytes("x", b"1"), lambda: s.exists("x")):
        with pytest.raises(StoreError) as e:
            op()
        assert "no-such-bucket-ddft" in str(e.value) and "does not exist" in str(e.value)


@pytest.mark.integration
def test_s3_unreachable_endpoint():
    endpoint = f"http://127.0.0.1:{free_port()}"  # a port with nothing listening
    s = Store("s3://b/root", endpoint_url=endpoint, region="us-east-1", access_key_id="a", secret_access_key="b")
    with pytest.raises(StoreError) as e:
        s.read_bytes("x")
    assert endpoint in str(e.value) and "s3://b/root/x" in str(e.value)


@pytest.mark.integration
def test_s3_env_fallback(s3_endpoint, s3_store, monkeypatch):
    s3_store.write_text("k.txt", "v")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_endpoint.region)
    s = Store(s3_store.uri)  # keys from AWS_ACCESS_KEY_ID/SECRET set by the fixture
    assert s.read_text("k.txt") == "v"
    fs, root = s.pyarrow_fs()
    assert fs.get_file_info(f"{root}/k.txt").size == 1


def test_create_bytes_has_one_winner_among_concurrent_creators(store):
    """The store's compare-and-set: of 16 threads creating one key, exactly one writes it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        won = list(pool.map(lambda i: store.create_bytes("locks/one", f"writer {i}".encode()), range(16)))
    assert won.count(True) == 1
    assert store.read_bytes("locks/one") == f"writer {won.index(True)}".encode()
    assert store.create_bytes("locks/one", b"again") is False and store.list("locks") == ["locks/one"]
    assert store.create_json("locks/two", {"a": 1}) and store.read_json("locks/two") == {"a": 1}


def test_delete_leaves_no_empty_folders_on_file_stores(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write_bytes("a/b/c/d.txt", b"x")
    store.write_bytes("a/keep.txt", b"y")
    store.delete("a/b/c")
    assert not (tmp_path / "store" / "a" / "b").exists() and (tmp_path / "store" / "a" / "keep.txt").exists()


def test_update_json_never_loses_a_concurrent_update(store):
    """16 writers incrementing one counter at once, each a read-change-write: the count is 16."""
    from concurrent.futures import ThreadPoolExecutor

    def bump(_):
        return store.update_json("state/counter.json", lambda doc: {"n": (doc or {"n": 0})["n"] + 1})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(bump, range(16)))
    assert store.read_json("state/counter.json") == {"n": 16}
    assert store.list("state") == ["state/counter.json"]  # no lock or temp files among the objects

    def refuse(doc):
        raise ValueError("no")

    with pytest.raises(ValueError):
        store.update_json("state/counter.json", refuse)
    assert store.read_json("state/counter.json") == {"n": 16}
