"""Tenants: keys are shown once, stored only as sha256, and checked against every tenant."""
import hashlib

import pytest

from ddft.store import Store
from ddft.tenants import TENANTS_KEY, TenantError, Tenants, check_admin


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


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


def test_errors_carry_http_status(store):
    tenants = Tenants(store)
    tenants.add("acme")
    with pytest.raises(TenantError) as err:
        tenants.add("acme")
    assert err.value.status == 409
    for bad in ("", "Acme", "../x", "a/b", "%2e%2e", "-x", "a" * 58):
        with pytest.raises(TenantError) as err:
            tenants.add(bad)
        assert err.value.status == 400, bad
    with pytest.raises(TenantError) as err:
        tenants.rotate("nobody")
    assert err.value.status == 404
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
