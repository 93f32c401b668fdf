"""Who is calling: `Authorization: Bearer <key>` names a tenant (keys are stored hashed in the
store's tenants.json) or the admin (the key in the env var serve.admin_key_env, held here only
as its sha256). No header: anonymous, which sees the platform's adapters only."""

import asyncio
import hashlib
import hmac

from fastapi import Request

from ddft.store import Store
from ddft.tenants import Tenants
from serve.errors import Forbidden, Unauthorized


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Auth:
    def __init__(self, store: Store, admin_key_sha256: str | None):
        self.tenants = Tenants(store)
        self.admin_sha = admin_key_sha256

    @staticmethod
    def _key(request: Request) -> str | None:
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("send the key as 'Authorization: Bearer <key>'", "bad_authorization")
        return key.strip()

    def _is_admin(self, key: str) -> bool:
        return self.admin_sha is not None and hmac.compare_digest(sha256(key), self.admin_sha)

    async def tenant(self, request: Request, required: bool = False) -> str | None:
        """The caller's tenant, None if anonymous (or the admin); a wrong key is 401, never anonymous."""
        key = self._key(request)
        if key is None:
            if required:
                raise Unauthorized(
                    "this needs a tenant key: 'Authorization: Bearer <key>' "
                    "(an admin creates tenants and their keys: POST /v1/tenants)",
                    "missing_key",
                )
            return None
        if self._is_admin(key):
            if required:
                raise Forbidden(
                    "the admin key manages tenants; adapters are uploaded and managed with a tenant's own key",
                    "admin_not_tenant",
                )
            return None
        tenant = await asyncio.to_thread(self.tenants.authenticate, key)
        if tenant is None:
            raise Unauthorized(
                "the key is not valid (wrong, rotated or its tenant removed); ask your admin for a key", "bad_key"
            )
        return tenant

    def is_admin(self, request: Request) -> bool:
        """Whether the caller sent the admin key (no error either way: for routes open to all that
        show the admin more)."""
        try:
            key = self._key(request)
        except Unauthorized:
            return False
        return key is not None and self._is_admin(key)

    async def admin(self, request: Request) -> None:
        key = self._key(request)
        if key is None:
            raise Unauthorized("tenant management needs the admin key: 'Authorization: Bearer <key>'", "missing_key")
        if self.admin_sha is None:
            raise Forbidden(
                "no admin key is configured: set the environment variable named "
                "by serve.admin_key_env (default DDFT_ADMIN_KEY) where `serve run` starts",
                "admin_disabled",
            )
        if not self._is_admin(key):
            raise Forbidden("this key is not the admin key; tenant management needs the admin key", "not_admin")
