"""Tenants: keys are shown once, stored only as sha256, and checked against every tenant."""

import hashlib

import pytest

from ddft.errors import BadArgument, Conflict, NotFound
from ddft.store import Store
from ddft.tenants import TENANTS_KEY, Tenants, check_admin
from serve.errors import status_of


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    if request.param == "file":
        return Store(str(tmp_path / "store"))
    return request.getfixturevalue("s3_store")


def test_add_authenticate_rotate_remove(store):
    tenants = Tenants(store)
    key = tenants.add("acme")
    other = tenants.add("bistro")
    assert key.startswith("ddft-") and len(key) > 40 and key != other
    assert tenants.names() == ["acme", "bistro"]
    assert tenants.authenticate(key) == "acme" and tenants.authenticate(other) == "bistro"
    for wrong in ("", None, "ddft-nope", key[:-1], key + "x", other.upper()):
        assert tenants.authenticate(wrong) is None

    stored = store.read_text(TENANTS_KEY)  # only digests on disk
    assert key not in stored and other not in stored
    assert store.read_json(TENANTS_KEY)["tenants"]["acme"]["key_sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert store.read_json(TENANTS_KEY)["tenants"]["acme"]["created_at"]

    new = tenants.rotate("acme")
    assert new != key and tenants.authenticate(key) is None and tenants.authenticate(new) == "acme"
    assert tenants.authenticate(other) == "bistro"

    assert tenants.remove("acme") is True and tenants.remove("acme") is False
    assert tenants.authenticate(new) is None and tenants.names() == ["bistro"]


def test_errors_are_typed_and_map_to_http_status(store):
    tenants = Tenants(store)
    tenants.add("acme")
    with pytest.raises(Conflict) as err:
        tenants.add("acme")
    assert (status_of(err.value), err.value.code) == (409, "tenant_exists")
    for bad in ("", "Acme", "../x", "a/b", "%2e%2e", "-x", "a" * 58):
        with pytest.raises(BadArgument) as err:
            tenants.add(bad)
        assert (status_of(err.value), err.value.code) == (400, "tenant_bad_name"), bad
    with pytest.raises(NotFound) as err:
        tenants.rotate("nobody")
    assert (status_of(err.value), err.value.code) == (404, "tenant_unknown")
    assert tenants.names() == ["acme"]


def test_other_instances_see_changes_after_the_cache_ttl(store):
    key = Tenants(store).add("acme")
    cached = Tenants(store, cache_ttl_s=3600)
    fresh = Tenants(store, cache_ttl_s=0)
    assert cached.authenticate(key) == fresh.authenticate(key) == "acme"
    Tenants(store).rotate("acme")
    assert cached.authenticate(key) == "acme"  # still within its TTL: no store read per request
    assert fresh.authenticate(key) is None


def test_check_admin():
    assert check_admin("s3cret-admin", "s3cret-admin")
    assert not check_admin("s3cret-admin ", "s3cret-admin")
    assert not check_admin("", "s3cret-admin") and not check_admin(None, "s3cret-admin")
    assert not check_admin("", "") and not check_admin("anything", None)  # no admin key: no admin


def test_two_admins_at_once_never_lose_a_change(store):
    """16 adds through two instances (two replicas' gateways) at once: every tenant is there."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = Tenants(store), Tenants(store)
    names = [f"t{i}" for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        keys = dict(zip(names, pool.map(lambda i: (a, b)[i % 2].add(names[i]), range(16))))
    assert Tenants(store).names() == sorted(names)
    assert all(Tenants(store).authenticate(k) == n for n, k in keys.items())
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda i: (a, b)[i % 2].remove(names[i]), range(0, 16, 2)))
    assert Tenants(store).names() == sorted(names[1::2])


def test_removing_a_tenant_removes_its_adapters_and_a_new_one_inherits_nothing(store):
    tenants = Tenants(store)
    tenants.add("acme")
    tenants.add("bistro")
    for owner in ("tenant-acme", "tenant-bistro"):
        store.write_json(f"adapters/{owner}/mine/v1/manifest.json", {})
        store.write_bytes(f"adapters/{owner}/mine/v1/adapter_model.safetensors", b"w")
    assert tenants.remove("acme")
    assert store.list("adapters/tenant-acme") == [] and store.list("adapters/tenant-bistro")
    tenants.add("acme")
    assert store.list("adapters/tenant-acme") == []  # the new acme starts with nothing
    tenants.remove("acme")
    # a removal whose adapter deletion broke off: removing again finishes it, even with the tenant gone
    store.write_json("adapters/tenant-acme/left/v1/manifest.json", {})
    assert tenants.remove("acme") is True and store.list("adapters/tenant-acme") == []
    assert tenants.remove("acme") is False and tenants.remove("../x") is False
