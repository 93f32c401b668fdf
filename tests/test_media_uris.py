"""Media URIs (video_uri, image_uri, a chat image_url) read only what requests may read: keys under
serve.media_prefixes. A private key (an adapter, a base, a run, tenants.json) answers exactly as a
missing one does, control characters are a 400, sizes are checked before a byte is fetched (a HEAD
on S3), and no error names where the store is."""

from __future__ import annotations

import asyncio

import pytest

from ddft.config import ConfigError, ServeSettings
from ddft.errors import DdftError
from ddft.store import Store
from serve.errors import ApiError, to_http
from serve.inputs import read_store

PREFIXES = ["datasets/raw/"]
LIMIT = 1000


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    store = Store(str(tmp_path / "store")) if request.param == "file" else request.getfixturevalue("s3_store")
    store.write_bytes("datasets/raw/clips/one.mp4", b"video bytes")
    store.write_bytes("datasets/raw/clips/big.mp4", b"\0" * (LIMIT + 1))
    store.write_bytes("adapters/tenant-x/secret/v1/adapter_model.safetensors", b"weights")
    store.write_bytes("models/tiny/model.safetensors", b"base")
    store.write_bytes("tenants.json", b"{}")
    return store


def _read(store, uri) -> bytes:
    return asyncio.run(read_store(store, uri, LIMIT, PREFIXES))


def _refusal(store, uri) -> ApiError:
    with pytest.raises(DdftError) as err:
        _read(store, uri)
    http = to_http(err.value)
    assert store.uri not in http.detail and "/store" not in http.detail, http.detail
    return http


def test_media_under_the_prefixes_is_read_by_key_or_uri(store):
    assert _read(store, "datasets/raw/clips/one.mp4") == b"video bytes"
    assert _read(store, store.url("datasets/raw/clips/one.mp4")) == b"video bytes"


def test_private_keys_answer_as_missing_ones_do(store):
    """Whether tenant-x has an adapter named secret must not be learnable from its answer."""
    missing = _refusal(store, "adapters/tenant-x/nothing/v1/adapter_model.safetensors")
    for uri in (
        "adapters/tenant-x/secret/v1/adapter_model.safetensors",
        "models/tiny/model.safetensors",
        "tenants.json",
        store.url("tenants.json"),
        "datasets/prepared/x.parquet",
    ):
        err = _refusal(store, uri)
        assert (err.status, err.error) == (missing.status, missing.error) == (404, "not_found")
        key = uri.removeprefix(store.uri + "/")
        assert err.detail == missing.detail.replace("adapters/tenant-x/nothing/v1/adapter_model.safetensors", key)


@pytest.mark.parametrize(
    "uri", ["datasets/raw/clips/one.mp4\0", "datasets/raw/\nclips/one.mp4", "datasets/raw/clips/\x7fone.mp4", "\x01"]
)
def test_control_characters_are_a_bad_request(store, uri):
    err = _refusal(store, uri)
    assert (err.status, err.error) == (400, "bad_uri") and "control characters" in err.detail


def test_size_is_checked_before_the_object_is_fetched(store, monkeypatch):
    fetched = []
    monkeypatch.setattr(Store, "read_bytes", lambda self, key: fetched.append(key))
    err = _refusal(store, "datasets/raw/clips/big.mp4")
    assert (err.status, err.error, fetched) == (413, "too_large", [])


def test_outside_the_store_and_escapes_answer_as_missing_media_does(store):
    for uri in (
        "file:///etc/passwd",
        "s3://other-bucket/datasets/raw/x.mp4",
        "datasets/raw/../../tenants.json",
        "/etc/passwd",
    ):
        err = _refusal(store, uri)
        assert (err.status, err.error) == (404, "not_found"), uri


@pytest.mark.parametrize("prefix", ["adapters/", "adapters/tenant-x/", "", "/", "models", "runs/x/", "../x/"])
def test_a_media_prefix_never_opens_private_keys(prefix):
    with pytest.raises((ConfigError, ValueError)):
        ServeSettings(media_prefixes=[prefix])
    assert ServeSettings(media_prefixes=["datasets/raw/", "media/"]).media_prefixes == ["datasets/raw/", "media/"]
