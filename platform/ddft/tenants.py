"""Tenants and their API keys, kept in the store as tenants.json with only the keys' sha256.

Keys are 256 random bits, so a plain sha256 is enough (no slow KDF needed: there is nothing to
brute-force); a key is shown once, on add or rotate, and never stored in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime

from ddft.adapters import registry
from ddft.adapters.ref import TENANT_NAME
from ddft.errors import BadArgument, Conflict, NotFound
from ddft.store import Store

TENANTS_KEY = "tenants.json"
KEY_PREFIX = "ddft-"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_admin(key: str | None, admin_key: str | None) -> bool:
    """Constant-time admin check; no admin key configured means no admin access."""
    if not admin_key or not isinstance(key, str):
        return False
    return hmac.compare_digest(_digest(key), _digest(admin_key))  # equal lengths: no length leak


class Tenants:
    """tenants.json: {"tenants": {name: {"key_sha256": hex, "created_at": iso}}}.

    Every change is one Store.update_json: atomic against every other writer (two admins, two
    replicas, two processes), so none loses another's add, rotate or remove.
    """

    def __init__(self, store: Store, cache_ttl_s: float = 2.0):
        self.store, self.cache_ttl_s = store, cache_ttl_s
        self._cached: dict | None = None
        self._read_at = float("-inf")

    def _load(self) -> dict:
        data = self.store.read_json(TENANTS_KEY) if self.store.exists(TENANTS_KEY) else {}
        data.setdefault("tenants", {})
        self._cached, self._read_at = data, time.monotonic()
        return data

    def _update(self, change) -> dict:
        """Apply change(tenants dict) atomically; the new document (cached here at once)."""

        def on_doc(doc: dict | None) -> dict:
            doc = doc or {}
            change(doc.setdefault("tenants", {}))
            return doc

        data = self.store.update_json(TENANTS_KEY, on_doc)
        self._cached, self._read_at = data, time.monotonic()
        return data

    @staticmethod
    def _new_key(tenants: dict, name: str, created_at: str) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        tenants[name] = {"key_sha256": _digest(key).hex(), "created_at": created_at}
        return key

    def add(self, name: str) -> str:
        """Create a tenant; returns its key (the only time it is shown)."""
        if not isinstance(name, str) or not TENANT_NAME.match(name):
            raise BadArgument(
                code="tenant_bad_name",
                detail=f"tenant name {name!r} is not allowed: use 1-57 lowercase letters, digits, "
                "'.', '_' or '-', starting with a letter or digit",
            )
        keys = []

        def change(tenants: dict) -> None:
            if name in tenants:
                raise Conflict(
                    code="tenant_exists", detail=f"tenant {name!r} already exists: rotate its key or remove it first"
                )
            keys[:] = [self._new_key(tenants, name, _now())]

        self._update(change)
        return keys[0]

    def rotate(self, name: str) -> str:
        """A new key for the tenant; the old one stops working at once (after the cache TTL elsewhere)."""
        keys = []

        def change(tenants: dict) -> None:
            if name not in tenants:
                raise NotFound(code="tenant_unknown", detail=f"no tenant {name!r}: add it first")
            keys[:] = [self._new_key(tenants, name, tenants[name].get("created_at", _now()))]

        self._update(change)
        return keys[0]

    def remove(self, name: str) -> bool:
        """Remove the tenant and every adapter it uploaded; False if there was neither. Idempotent:
        if deleting the adapters fails part way, removing again finishes it, so a new tenant of
        the same name never inherits them."""
        if not isinstance(name, str) or not TENANT_NAME.match(name):
            return False
        removed = []

        def change(tenants: dict) -> None:
            removed[:] = [tenants.pop(name, None) is not None]

        self._update(change)  # first: its key stops working, so nothing new lands under its adapters
        leftover = registry.delete_owner(self.store, registry.tenant_owner(name))
        return removed[0] or bool(leftover)

    def names(self) -> list[str]:
        return sorted(self._load()["tenants"])

    def authenticate(self, key: str | None) -> str | None:
        """The tenant whose key this is, or None. Compares against every tenant, always."""
        if not isinstance(key, str) or not key:
            return None
        data = self._cached
        if data is None or time.monotonic() - self._read_at > self.cache_ttl_s:
            data = self._load()
        digest, found = _digest(key), None
        for name, entry in data["tenants"].items():
            stored = bytes.fromhex(entry.get("key_sha256", ""))
            if hmac.compare_digest(digest, stored):  # no break: the time doesn't depend on who matched
                found = name
        return found
