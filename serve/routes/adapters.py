"""Tenant adapters: upload (validated before it exists), list, read, delete; a tenant's own key."""

import asyncio

from fastapi import Path, Query, Request

from ddft.adapters import registry
from ddft.adapters.archive import unpack
from ddft.adapters.ref import NAME, AdapterRef, model_id
from ddft.adapters.registry import Manifest
from ddft.adapters.upload import publish_upload
from ddft.errors import DdftError, NotFound, UnsupportedFormat
from ddft.store import StoreError
from serve import answers, inputs, prometheus
from serve import openapi_docs as docs
from serve.api import route
from serve.errors import status_of

ARCHIVE_TYPES = (
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/zip",
    "application/x-zip-compressed",
    "application/octet-stream",
)
MODALITY = {"type": "string", "enum": ["image", "video", "text"]}
UPLOAD_FILES = {
    "type": "array",
    "minItems": 2,
    "maxItems": 8,
    "items": {"type": "string", "format": "binary"},
    "description": "adapter_config.json and adapter_model.safetensors (never pickle)",
}
ARCHIVE = {"schema": {"type": "string", "format": "binary"}}
YOURS = r"^[a-z0-9][a-z0-9_.-]{0,63}(/v[1-9][0-9]{0,8})?$"  # name or name/vN


def _yours(description: str):
    return Path(description=description, json_schema_extra={"pattern": YOURS})


class AdapterRoutes:
    def _adapter_view(self, m: Manifest) -> answers.AdapterView:
        return answers.AdapterView(
            adapter=m.ref,
            model=model_id(self.base_id, m.ref),
            name=m.name,
            version=m.version,
            modality=m.modality,
            rank=m.rank,
            owner=m.owner,
            source=m.source,
            created_at=m.created_at,
            weights_sha256=m.weights_sha256,
        )

    @route(
        "put",
        "/v1/adapters/{name:path}",
        status_code=201,
        response_model=answers.AdapterView,
        responses=docs.errors(),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": docs.multipart(None, ("files", "modality"), files=UPLOAD_FILES, modality=MODALITY)
                    },
                    "application/x-tar": ARCHIVE,
                    "application/zip": ARCHIVE,
                },
            }
        },
    )
    async def put_adapter(
        self,
        request: Request,
        name: str = Path(description="the adapter's name", json_schema_extra={"pattern": NAME.pattern}),
        modality: str | None = Query(None, description="for archive bodies", json_schema_extra=MODALITY),
    ):
        """Upload a PEFT LoRA folder: multipart files (adapter_config.json, adapter_model.safetensors)
        plus field `modality`, or a tar/zip body with ?modality=. Validated before it exists."""
        try:
            manifest = await self._upload(request, name, modality)
        except (DdftError, StoreError) as err:
            prometheus.get().uploads.labels(str(status_of(err))).inc()
            raise
        prometheus.get().uploads.labels("201").inc()
        self._resolved.clear()
        return self._adapter_view(manifest)

    async def _upload(self, request: Request, name: str, modality: str | None) -> Manifest:
        tenant = await self.auth.tenant(request, required=True)
        limit = int(self.s.max_adapter_mb * inputs.MB)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            await inputs.bounded(request, limit + inputs.MB, "adapter upload")
            form = await request.form(max_files=8, max_fields=inputs.FORM_FIELDS)
            modality = form.get("modality") if isinstance(form.get("modality"), str) else modality
            files = {}
            for _, value in form.multi_items():
                if not isinstance(value, str):
                    files[value.filename or ""] = inputs.check_size(await value.read(), limit, "adapter upload")
            files = unpack(files=files, max_bytes=limit)
        elif ctype in ARCHIVE_TYPES:
            body = await inputs.read_body(request, limit, "adapter upload")
            files = unpack(archive=body, content_type=ctype, max_bytes=limit)
        else:
            raise UnsupportedFormat(
                f"Content-Type {ctype[:60]!r}: upload multipart/form-data "
                "with adapter_config.json and adapter_model.safetensors, or a .tar/.tar.gz/.zip "
                "of the PEFT folder",
                "unsupported_media_type",
            )
        return await asyncio.to_thread(
            publish_upload,
            self.store,
            files,
            tenant=tenant,
            name=name,
            modality=modality,
            spec=self.spec,
            max_rank=self.s.max_lora_rank,
            max_bytes=limit,
        )

    @route("get", "/v1/adapters", response_model=answers.AdapterList, responses=docs.errors())
    async def list_adapters(self, request: Request):
        """Your adapters, the newest version of each."""
        tenant = await self.auth.tenant(request, required=True)
        mine = await asyncio.to_thread(registry.list_adapters, self.store, registry.tenant_owner(tenant))
        return answers.AdapterList(adapters=[self._adapter_view(m) for m in mine])

    @route("get", "/v1/adapters/{name:path}", response_model=answers.AdapterDetail, responses=docs.errors())
    async def get_adapter(self, request: Request, name: str = _yours("name, or name/vN")):
        """One of your adapters (name or name/vN): its manifest and versions."""
        tenant = await self.auth.tenant(request, required=True)
        _, manifest = await asyncio.to_thread(self._own, tenant, name)
        versions = await asyncio.to_thread(registry.versions, self.store, manifest.owner, manifest.name)
        view = self._adapter_view(manifest).model_dump()
        return answers.AdapterDetail(**view, versions=versions, metrics=manifest.metrics)

    def _own(self, tenant: str, path: str) -> tuple[AdapterRef, Manifest]:
        """Your adapter named by a route's path: name (the newest) or name/vN, AdapterRef's grammar;
        404 alike for someone else's, nobody's and a name no adapter can have."""
        owner = registry.tenant_owner(tenant)
        try:
            ref = AdapterRef.parse(path)
        except DdftError:
            ref = None
        manifest = None
        if ref is not None and ref.owner in (None, owner):
            manifest = registry.read_manifest(self.store, owner, ref.name, ref.version)
        if manifest is None:
            raise NotFound(f"you have no adapter {path[:100]!r}; GET /v1/adapters lists yours", "unknown_adapter")
        return ref, manifest

    @route("delete", "/v1/adapters/{name:path}", response_model=answers.AdaptersDeleted, responses=docs.errors())
    async def delete_adapter(self, request: Request, name: str = _yours("name (every version), or name/vN")):
        """Delete one version (name/vN) or every version (name) of your adapter."""
        tenant = await self.auth.tenant(request, required=True)
        ref, manifest = await asyncio.to_thread(self._own, tenant, name)
        deleted = await asyncio.to_thread(registry.delete, self.store, manifest.owner, manifest.name, ref.version)
        self._resolved.clear()
        return answers.AdaptersDeleted(deleted=[str(AdapterRef(manifest.name, manifest.owner, v)) for v in deleted])
