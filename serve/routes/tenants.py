"""Tenant management, with the admin key: add (its key shown once), list, remove."""

import asyncio

from fastapi import Path, Request

from ddft.adapters.ref import TENANT_NAME
from ddft.errors import NotFound
from serve import answers, bodies, inputs
from serve import openapi_docs as docs
from serve.api import route


class TenantRoutes:
    @route(
        "post",
        "/v1/tenants",
        status_code=201,
        response_model=answers.TenantCreated,
        responses=docs.errors(),
        openapi_extra=docs.body(bodies.NewTenant),
    )
    async def add_tenant(self, request: Request):
        """A new tenant and its key (shown once)."""
        await self.auth.admin(request)
        name = bodies.parse(bodies.NewTenant, await inputs.json_body(request)).name
        key = await asyncio.to_thread(self.auth.tenants.add, name)
        return answers.TenantCreated(name=name, key=key, detail="shown once: store it now")

    @route("get", "/v1/tenants", response_model=answers.TenantList, responses=docs.errors())
    async def list_tenants(self, request: Request):
        """Every tenant's name."""
        await self.auth.admin(request)
        return answers.TenantList(tenants=await asyncio.to_thread(self.auth.tenants.names))

    @route("delete", "/v1/tenants/{name}", response_model=answers.TenantDeleted, responses=docs.errors())
    async def remove_tenant(
        self, request: Request, name: str = Path(json_schema_extra={"pattern": TENANT_NAME.pattern})
    ):
        """Remove a tenant: its key stops working."""
        await self.auth.admin(request)
        if not await asyncio.to_thread(self.auth.tenants.remove, name):
            raise NotFound(f"no tenant {name[:64]!r}; GET /v1/tenants lists them", "tenant_unknown")
        return answers.TenantDeleted(deleted=name)
