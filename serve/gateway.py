"""The HTTP ingress (FastAPI in a Serve deployment): auth, input checks, routing, metrics.

No `from __future__ import annotations` here: FastAPI must see the real `Request` type through
Serve's class-based routes.

Routing (DESIGN.md): an adapter named explicitly (the caller's or the platform's) -> the
caller's adapter for the modality -> the platform's DDFT adapter for it -> the base. Every
answer says which adapter and base answered. Generation happens on the model replicas; media is
decoded here in a child process; adapter uploads are validated here before they exist.
"""

import asyncio
import copy
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ddft import config as ddft_config
from ddft.adapters import registry
from ddft.adapters.archive import unpack
from ddft.adapters.ref import AdapterRef
from ddft.adapters.registry import Manifest
from ddft.adapters.upload import publish_upload
from ddft.engines.base import Chunk, GenerateRequest, GenerateResult
from ddft.engines.grammar import Constraint
from ddft.errors import DdftError
from ddft.models.info import BaseInfo, base_spec
from ddft.prompts import QUESTIONS
from ddft.recipes import read_recipe
from ddft.store import Store
from serve import bodies, errors, inputs, openapi_docs, prometheus, sse
from serve.auth import Auth
from serve.decoder import Decoder
from serve.errors import ApiError, busy
from serve.model_server import ServedResult, multiplexed_id
from serve.openai import ChunkStream, adapter_of, chat_choices, chat_input, completion

log = logging.getLogger("ddft.serve")
MAX_HANDLES = 4096  # cached model handles (one per adapter version and streaming or not)
RESOLVE_TTL_S = 2.0  # other gateways' uploads and deletes show up after this; our own at once
ARCHIVE_TYPES = (
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/zip",
    "application/x-zip-compressed",
    "application/octet-stream",
)
MB = inputs.MB
WEB_PAGE = Path(__file__).resolve().parent / "web" / "index.html"

api = FastAPI(
    title="ddft",
    description="Directed Domain Fine-Tuning of Video-LLaVA: one adapter per modality, "
    "tenant adapters, one shared base",
)
errors.install(api)


def _openapi(settings: ddft_config.ServeSettings | None = None) -> dict:
    """FastAPI's document, finished to say what the server really answers under `settings` (the
    defaults for docs/openapi.json; a replica's own config once it starts); cached like FastAPI's."""
    if api.openapi_schema is None or settings is not None:
        s = settings or ddft_config.ServeSettings()
        api.openapi_schema = None  # FastAPI.openapi builds afresh only then
        api.openapi_schema = openapi_docs.finish(
            FastAPI.openapi(api), errors.OPENAI_ROUTES, {"max_new_tokens": s.max_new_tokens, "max_n": s.max_n}
        )
    return api.openapi_schema


api.openapi = _openapi


@api.middleware("http")
async def _observe(request: Request, call_next):
    """Requests and latency by endpoint (route template), modality and adapter (set by the route)."""
    t0 = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        if endpoint not in ("/metrics", "/healthz"):
            prometheus.get().observe(
                endpoint,
                getattr(request.state, "modality", "none"),
                getattr(request.state, "adapter", None),
                status,
                time.perf_counter() - t0,
            )


GATEWAY_CPUS = 0.25


@serve.deployment(ray_actor_options={"num_cpus": GATEWAY_CPUS}, max_ongoing_requests=256)
@serve.ingress(api)
class Gateway:
    def __init__(
        self,
        model: DeploymentHandle,
        cfg: ddft_config.ServeConfig,
        store: Store,
        admin_key_sha256: str | None = None,
    ):
        self.model, self.cfg, self.store = model, cfg, store
        self.s = cfg.serve
        _openapi(self.s)  # /openapi.json states this config's limits
        self.base_id = cfg.base.id
        self.limits = bodies.Limits(self.s.max_new_tokens, self.s.max_n, self.base_id)  # what bodies may ask
        self.auth = Auth(store, admin_key_sha256)
        self.spec = base_spec(store, self.base_id)  # the base's LM modules: what an upload may target
        self.base = BaseInfo(self.base_id, self.spec.fingerprint, "")
        self.decode = Decoder()
        self.decode.warm()
        self._resolved: dict[tuple, tuple[float, Manifest | None]] = {}
        self._handles: dict[tuple[str | None, bool], DeploymentHandle] = {}

    # -- adapters for a request --------------------------------------------------------------------
    async def _resolve(self, request: Request, modality: str, tenant: str | None, explicit) -> Manifest | None:
        """The adapter for a request: registry.resolve decides (visibility, base, modality); `explicit`
        is what the caller wrote, in AdapterRef's grammar (a /v1/models id too)."""
        request.state.modality = modality
        ref = None if explicit is None else AdapterRef.parse(explicit, self.base_id)
        key = (modality, tenant, ref)
        hit = self._resolved.get(key)
        if hit and time.monotonic() - hit[0] < RESOLVE_TTL_S:
            manifest = hit[1]
        else:
            manifest = await asyncio.to_thread(registry.resolve, self.store, modality, tenant, ref, self.base)
            self._resolved[key] = (time.monotonic(), manifest)
        request.state.adapter = manifest.ref if manifest else None
        return manifest

    # -- generation on the model replicas ------------------------------------------------------------
    def _handle(self, request: GenerateRequest, stream: bool = False) -> DeploymentHandle:
        """The model handle for a request, made once per (adapter, streaming) and kept: multiplexing
        sends it to a replica already holding these weights."""
        mux = multiplexed_id(request.adapter) if request.adapter else None
        handle = self._handles.get((mux, stream))
        if handle is None:
            if len(self._handles) >= MAX_HANDLES:  # deleted adapters' handles go with the rest
                self._handles.clear()
            options = {"stream": True} if stream else {}
            if mux is not None:
                options["multiplexed_model_id"] = mux
            handle = self._handles[(mux, stream)] = self.model.options(**options) if options else self.model
        return handle

    def _timeout(self) -> ApiError:
        return ApiError(
            504, "timeout", f"generation took over {self.s.request_timeout_s:.0f}s; retry, or lower max_new_tokens"
        )

    @staticmethod
    async def _first(start: Callable[[], Awaitable]):
        """`start()`'s answer from a replica: retried when the replica died, 503 when every queue is
        full, the engine's error as an ApiError (serve/errors.py)."""
        for attempt in range(3):
            try:
                return await start()
            except BackPressureError:
                raise busy("every model replica's queue is full; retry after the Retry-After seconds") from None
            except RayActorError:  # the replica died (killed, OOM): Serve is replacing it; try another
                if attempt == 2:
                    raise busy("a model replica is being replaced; retry shortly", 5) from None
                await asyncio.sleep(0.5 * (attempt + 1))
            except Exception as err:
                raise errors.from_engine(err) from None

    async def _generate(self, request: GenerateRequest) -> GenerateResult:
        handle = self._handle(request)

        async def call():
            response = handle.generate.remote(request)
            try:
                return await asyncio.wait_for(response, self.s.request_timeout_s)
            except TimeoutError:
                response.cancel()
                raise self._timeout() from None

        prometheus.get().queue_depth.inc()
        try:
            result = await self._first(call)
        finally:
            prometheus.get().queue_depth.dec()
        self._count(request, result)
        return result

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """The replica's chunks as they come, the last with the result. Every failure is an ApiError:
        before the first chunk the route still answers it as JSON; after, as an SSE error event."""
        handle = self._handle(request, stream=True)
        deadline = time.monotonic() + self.s.request_timeout_s
        replies = None

        async def next_chunk() -> Chunk:
            try:
                return await asyncio.wait_for(anext(replies), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise self._timeout() from None
            except StopAsyncIteration:
                raise ApiError(500, "generation_failed", "the model replica's stream ended without a result") from None

        async def start() -> Chunk:
            nonlocal replies
            replies = handle.stream.remote(request)
            return await next_chunk()

        prometheus.get().queue_depth.inc()
        chunk = None
        try:
            chunk = await self._first(start)
            while chunk.result is None:
                yield chunk
                try:
                    chunk = await next_chunk()
                except Exception as err:
                    raise errors.from_engine(err) from None
            self._count(request, chunk.result)  # before the last yield: the consumer closes us after it
            yield chunk
        finally:
            prometheus.get().queue_depth.dec()
            if replies is not None and (chunk is None or chunk.result is None):
                replies.cancel()  # timed out, failed or the client left: the replica stops the request

    @staticmethod
    async def _sse(
        first: Chunk,
        chunks: AsyncIterator[Chunk],
        events: Callable[[Chunk], list[str]],
        error_event: Callable[[ApiError], str],
        head: list[str] = (),
    ) -> AsyncIterator[str]:
        """A streamed answer's SSE body: `head`, events(chunk) for every chunk (the first already
        read by the route), an error event if the stream fails on the way, then [DONE]."""
        try:
            for text in head:
                yield text
            chunk = first
            while True:
                for text in events(chunk):
                    yield text
                if chunk.result is not None:
                    break
                chunk = await anext(chunks)
        except Exception as err:
            if not isinstance(err, ApiError):
                log.exception("streamed answer failed")
                err = ApiError(500, "internal_error", f"{type(err).__name__}: {str(err)[:300]}")
            yield error_event(err)
        finally:
            await chunks.aclose()
        yield sse.DONE

    @staticmethod
    def _count(request: GenerateRequest, result: GenerateResult) -> None:
        if isinstance(result, ServedResult):  # the replica's engine counters
            prometheus.get().replica_stats(result.replica, result.stats)
        prometheus.get().engine_timings(request.modality, result.adapter, result.timings)
        prometheus.get().count_tokens(
            request.modality,
            result.adapter,
            result.timings.get("prompt_tokens", 0),
            result.timings.get("new_tokens", 0),
        )

    @staticmethod
    def _engine_timings(result: GenerateResult) -> dict:
        return {
            k: result.timings[k]
            for k in ("queue_s", "batch_size", "adapters_in_batch", "new_tokens")
            if k in result.timings
        }

    @property
    def _media_limit(self) -> int:
        return int(self.s.max_media_mb * MB)

    async def _media_from(self, kind: str, data: bytes | None, uri) -> tuple:
        """Decoded pixels and the decode seconds, from bytes or a store key/URI."""
        if data is None:
            data = await inputs.read_store(self.store, uri, self._media_limit, self.s.media_prefixes)
        inputs.check_size(data, self._media_limit, kind)
        t = time.perf_counter()
        pixels = await self.decode(kind, data)
        return pixels, time.perf_counter() - t

    # -- inference routes ----------------------------------------------------------------------------
    @staticmethod
    def _recipe_docs() -> dict:
        """The recipe route's OpenAPI table with its answer's schema: bodies.RecipeAnswer (the recipe
        schema of ddft.recipes) as components/schemas/RecipeAnswer."""
        doc = copy.deepcopy(openapi_docs.RECIPES)
        openapi_docs.SCHEMAS["RecipeAnswer"] = openapi_docs.schema(bodies.RecipeAnswer)
        doc["responses"]["200"]["content"]["application/json"]["schema"] = {"$ref": "#/components/schemas/RecipeAnswer"}
        return doc

    @api.post("/v1/recipes", openapi_extra=_recipe_docs())
    async def recipes(self, request: Request):
        """A cooking video (multipart field `video`, or JSON {"video_uri": ...}) -> its recipe; with
        ?stream=true as SSE: `delta` events ({"text"}) as it is written, then a `recipe` event. The
        model writes under the recipe grammar (ddft.recipes), so the answer is a RecipeAnswer."""
        t0 = time.perf_counter()
        tenant = await self.auth.tenant(request)
        request.state.modality = "video"
        streaming = inputs.flag(request.query_params.get("stream"), "stream")
        ctype = request.headers.get("content-type", "")
        data = uri = None
        if ctype.startswith("multipart/form-data"):
            await inputs.bounded(request, self._media_limit + MB, "video")
            form = await request.form(max_files=1, max_fields=inputs.FORM_FIELDS)
            upload = form.get("video")
            if upload is None or isinstance(upload, str):
                raise ApiError(
                    400,
                    "missing_video",
                    "send the video as a multipart file field named 'video' "
                    '(curl -F video=@clip.mp4 ...), or JSON {"video_uri": "<store key or URI>"}',
                )
            data = inputs.check_size(await upload.read(), self._media_limit, "video")
            body = bodies.parse(bodies.RecipeForm, {k: v for k, v in form.items() if isinstance(v, str)}, self.limits)
        elif ctype.startswith("application/json"):
            # a URI: no media in the body, so the small cap
            body = bodies.parse(bodies.RecipeJson, await inputs.json_body(request), self.limits)
            uri = body.video_uri
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type {ctype[:80]!r}: upload multipart/form-data "
                "with a 'video' file, or send application/json with video_uri",
            )
        manifest = await self._resolve(request, "video", tenant, body.adapter)
        pixels, decode_s = await self._media_from("video", data, uri)
        settings = body.generation(self.s.max_new_tokens)
        gen = GenerateRequest("video", QUESTIONS["video"], pixels, manifest, constraint=Constraint.recipe(), **settings)
        t2 = time.perf_counter()
        if not streaming:
            return self._recipe(await self._generate(gen), decode_s, t0, t2)
        chunks = self._stream(gen)
        first = await anext(chunks)  # a failure before the first byte is still a JSON error

        def events(chunk: Chunk) -> list[str]:
            return ([sse.event({"text": chunk.text}, "delta")] if chunk.text else []) + (
                [sse.event(self._recipe(chunk.result, decode_s, t0, t2), "recipe")] if chunk.result else []
            )

        def error_event(err: ApiError) -> str:
            return sse.event(errors.body(err.status, err.error, err.detail), "error")

        return sse.response(self._sse(first, chunks, events, error_event))

    def _recipe(self, result: GenerateResult, decode_s: float, t0: float, t2: float) -> dict:
        """The RecipeAnswer (bodies.py): the recipe read from the text the grammar let the model write."""
        t3 = time.perf_counter()
        recipe = read_recipe(result.text, cut=result.finish_reason != "stop")
        answer = bodies.RecipeAnswer(
            **recipe.model_dump(),
            text=result.text,
            adapter=result.adapter,
            base=result.base,
            finish_reason="stop" if result.finish_reason == "stop" else "length",
            timings={
                "decode_s": round(decode_s, 4),
                "generate_s": round(t3 - t2, 4),
                "total_s": round(t3 - t0, 4),
                **self._engine_timings(result),
            },
        )
        return answer.model_dump(mode="json")

    @api.post("/v1/generate", openapi_extra=openapi_docs.GENERATE)
    async def generate(self, request: Request):
        """{"modality": "text"|"image", "question", "image_b64" | "image_uri"} -> the answer."""
        t0 = time.perf_counter()
        tenant = await self.auth.tenant(request)
        raw = await inputs.json_body(request, self._media_limit * 4 // 3 + MB)  # base64 media inside
        body = bodies.parse(bodies.Generate, raw, self.limits)
        modality = body.modality
        manifest = await self._resolve(request, modality, tenant, body.adapter)
        pixels, decode_s = None, 0.0
        if modality == "image":
            pixels, decode_s = await self._media_from("image", body.image(), body.image_uri)
        question = (body.question or QUESTIONS[modality]).strip()
        gen = GenerateRequest(modality, question, pixels, manifest, **body.generation(self.s.max_new_tokens))
        t1 = time.perf_counter()
        result = await self._generate(gen)
        t2 = time.perf_counter()
        return {
            "answer": result.text,
            "adapter": result.adapter,
            "base": result.base,
            "finish_reason": result.finish_reason,
            "timings": {
                "decode_s": round(decode_s, 4),
                "generate_s": round(t2 - t1, 4),
                "total_s": round(t2 - t0, 4),
                **self._engine_timings(result),
            },
        }

    @api.post("/v1/chat/completions", openapi_extra=openapi_docs.CHAT)
    async def chat_completions(self, request: Request):
        """OpenAI-compatible; `model` is the base id or "<base>:<adapter>"; text, image_url, video_url;
        "stream": true answers with chat.completion.chunk events (SSE)."""
        tenant = await self.auth.tenant(request)
        raw = await inputs.json_body(request, self._media_limit * 4 // 3 + MB)  # data: URLs inside
        chat = bodies.parse(bodies.Chat, raw, self.limits)
        conversation = chat_input(chat, self.base_id)
        manifest = await self._resolve(request, conversation.modality, tenant, conversation.adapter)
        pixels = None
        if conversation.modality != "text":
            pixels, _ = await self._media_from(conversation.modality, conversation.media, conversation.media_uri)
        gen = GenerateRequest(
            conversation.modality, conversation.question, pixels, manifest, **chat.generation(self.s.max_new_tokens)
        )
        model = self._model_id(manifest)
        if not chat.stream:
            return completion(model, await self._choices(gen, chat.n or 1))
        out = ChunkStream(model, chat.include_usage)
        return await self._openai_stream(request, gen, out, head=[sse.event(out.role())])

    @api.post("/v1/completions", openapi_extra=openapi_docs.COMPLETIONS)
    async def completions(self, request: Request):
        """OpenAI-compatible text completions: the prompt is continued as it is (no chat template);
        `model` is the base id or "<base>:<adapter>" (a text adapter); "stream": true as OpenAI streams."""
        tenant = await self.auth.tenant(request)
        req = bodies.parse(bodies.Completion, await inputs.json_body(request, MB), self.limits)
        manifest = await self._resolve(request, "text", tenant, adapter_of(req.model, self.base_id))
        gen = GenerateRequest("text", req.text, None, manifest, raw=True, **req.generation(self.s.max_new_tokens))
        model = self._model_id(manifest)
        if not req.stream:
            return completion(model, await self._choices(gen, req.n or 1), text=True)
        return await self._openai_stream(request, gen, ChunkStream(model, req.include_usage, text=True))

    def _model_id(self, manifest: Manifest | None) -> str:
        """The OpenAI model id of what answered: the base, or `<base>:<adapter ref>`."""
        return f"{self.base_id}:{manifest.ref}" if manifest else self.base_id

    async def _choices(self, gen: GenerateRequest, n: int) -> list[GenerateResult]:
        """n whole answers to one request, generated at once (openai.chat_choices seeds them)."""
        return await asyncio.gather(*(self._generate(g) for g in chat_choices(gen, n)))

    async def _openai_stream(self, request: Request, gen: GenerateRequest, out: ChunkStream, head: list[str] = ()):
        """An OpenAI streamed answer: `out`'s chunks as SSE (errors after the first byte as events)."""
        chunks = self._stream(gen)
        first = await anext(chunks)  # a failure before the first byte is still a JSON error

        def events(chunk: Chunk) -> list[str]:
            if chunk.result is None:
                return [sse.event(out.delta(chunk.text))] if chunk.text else []
            return [sse.event(out.delta(chunk.text, chunk.result))] + (
                [sse.event(out.usage(chunk.result))] if out.include_usage else []
            )

        def error_event(err: ApiError) -> str:  # OpenAI's mid-stream error: data {"error": {...}}
            return sse.event(errors.body(err.status, err.error, err.detail, request.url.path))

        return sse.response(self._sse(first, chunks, events, error_event, head=head))

    async def _model_objects(self, request: Request) -> list[dict]:
        """OpenAI model objects: the base, and `<base>:<adapter ref>` for each adapter the caller may use."""
        owners = registry.visible_owners(await self.auth.tenant(request))

        def visible() -> list[Manifest]:  # the caller's and the platform's folders, never the whole store
            return [m for owner in sorted(owners) for m in registry.list_adapters(self.store, owner)]

        manifests = await asyncio.to_thread(visible)  # StoreError: errors.install
        data = [{"id": self.base_id, "object": "model", "owned_by": registry.PLATFORM_OWNER, "root": self.base_id}]
        for m in manifests:
            if m.base_fingerprint == self.spec.fingerprint:
                data.append(
                    {
                        "id": self._model_id(m),
                        "object": "model",
                        "owned_by": m.owner,
                        "root": self.base_id,
                        "parent": self.base_id,
                        "modality": m.modality,
                        "adapter": m.ref,
                        "created_at": m.created_at,
                    }
                )
        return data

    @api.get("/v1/models")
    async def models(self, request: Request):
        """OpenAI-style: the base, and `<base>:<adapter ref>` for each adapter the caller may use."""
        return {"object": "list", "data": await self._model_objects(request)}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request):
        """One model object; 404 for a model that isn't served or the caller may not use (the same)."""
        for obj in await self._model_objects(request):
            if obj["id"] == model_id:
                return obj
        raise ApiError(
            404,
            "model_not_found",
            f"model {model_id[:100]!r} is not served here for this caller; GET /v1/models lists them",
        )

    # -- tenant adapters -----------------------------------------------------------------------------
    @api.put("/v1/adapters/{name:path}", openapi_extra=openapi_docs.UPLOAD)
    async def put_adapter(self, name: str, request: Request):
        """Upload a PEFT LoRA folder: multipart files (adapter_config.json, adapter_model.safetensors)
        plus field `modality`, or a tar/zip body with ?modality=. Validated before it exists."""
        tenant = await self.auth.tenant(request, required=True)
        limit = int(self.s.max_adapter_mb * MB)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        modality = request.query_params.get("modality")
        try:
            if ctype == "multipart/form-data":
                await inputs.bounded(request, limit + MB, "adapter upload")
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
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"Content-Type {ctype[:60]!r}: upload multipart/form-data "
                    "with adapter_config.json and adapter_model.safetensors, or a .tar/.tar.gz/.zip "
                    "of the PEFT folder",
                )
            manifest = await asyncio.to_thread(
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
        except DdftError as err:
            refused = errors.from_error(err)
            prometheus.get().uploads.labels(str(refused.status)).inc()
            raise refused from None
        except ApiError as err:
            prometheus.get().uploads.labels(str(err.status)).inc()
            raise
        prometheus.get().uploads.labels("201").inc()
        self._resolved.clear()
        return JSONResponse(self._adapter_view(manifest), status_code=201)

    def _adapter_view(self, m: Manifest) -> dict:
        return {
            "adapter": m.ref,
            "model": self._model_id(m),
            "name": m.name,
            "version": m.version,
            "modality": m.modality,
            "rank": m.rank,
            "owner": m.owner,
            "source": m.source,
            "created_at": m.created_at,
            "weights_sha256": m.weights_sha256,
        }

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        tenant = await self.auth.tenant(request, required=True)
        mine = await asyncio.to_thread(registry.list_adapters, self.store, registry.tenant_owner(tenant))
        return {"adapters": [self._adapter_view(m) for m in mine]}

    @api.get("/v1/adapters/{name:path}")
    async def get_adapter(self, name: str, request: Request):
        """One of your adapters (name or name/vN): its manifest and versions."""
        tenant = await self.auth.tenant(request, required=True)
        _, manifest = await asyncio.to_thread(self._own, tenant, name)
        versions = await asyncio.to_thread(registry.versions, self.store, manifest.owner, manifest.name)
        return {**self._adapter_view(manifest), "versions": versions, "metrics": manifest.metrics}

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
            raise ApiError(404, "unknown_adapter", f"you have no adapter {path[:100]!r}; GET /v1/adapters lists yours")
        return ref, manifest

    @api.delete("/v1/adapters/{name:path}")
    async def delete_adapter(self, name: str, request: Request):
        """Delete one version (name/vN) or every version (name) of your adapter."""
        tenant = await self.auth.tenant(request, required=True)
        ref, manifest = await asyncio.to_thread(self._own, tenant, name)
        deleted = await asyncio.to_thread(registry.delete, self.store, manifest.owner, manifest.name, ref.version)
        self._resolved.clear()
        return {"deleted": [str(AdapterRef(manifest.name, manifest.owner, v)) for v in deleted]}

    # -- tenants (admin key) -------------------------------------------------------------------------
    @api.post("/v1/tenants", openapi_extra=openapi_docs.TENANT)
    async def add_tenant(self, request: Request):
        await self.auth.admin(request)
        name = bodies.parse(bodies.NewTenant, await inputs.json_body(request)).name
        key = await asyncio.to_thread(self.auth.tenants.add, name)
        return JSONResponse({"name": name, "key": key, "detail": "shown once: store it now"}, status_code=201)

    @api.get("/v1/tenants")
    async def list_tenants(self, request: Request):
        await self.auth.admin(request)
        return {"tenants": await asyncio.to_thread(self.auth.tenants.names)}

    @api.delete("/v1/tenants/{name}")
    async def remove_tenant(self, name: str, request: Request):
        await self.auth.admin(request)
        if not await asyncio.to_thread(self.auth.tenants.remove, name):
            raise ApiError(404, "tenant_unknown", f"no tenant {name[:64]!r}; GET /v1/tenants lists them")
        return {"deleted": name}

    # -- the page and operations ---------------------------------------------------------------------
    @api.get("/", include_in_schema=False)
    async def page(self):
        """The try-a-recipe page (serve/web/index.html): a static page that calls this API."""
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @api.get("/eval/latest.png", include_in_schema=False)
    async def eval_chart(self):
        """The page's picture: the newest chart `ddft eval` saved (eval/<time>.png); 404 no_eval_chart
        before the first one."""
        from ddft.eval import chart

        _, png = await asyncio.to_thread(chart.latest, self.store)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @api.get("/healthz")
    async def healthz(self, request: Request):
        """For probes: the status only. With the admin key, also a replica's details (its loaded
        adapters, counters), which name tenants' adapters."""
        try:
            info = await asyncio.wait_for(self.model.info.remote(), 10)
        except Exception as err:
            log.warning("health: no model replica answered: %s: %s", type(err).__name__, err)
            return errors.error_response(
                503, "unhealthy", "no model replica answered; retry shortly", {"Retry-After": "5"}
            )
        return {"status": "ok", **(dataclasses.asdict(info) if self.auth.is_admin(request) else {})}

    @api.get("/metrics")
    async def prometheus(self):
        try:  # a replica's gauges now, not as of its last answer (best effort: a scrape never waits long)
            info = await asyncio.wait_for(self.model.info.remote(), 2)
            prometheus.get().replica_stats(info.replica, info.stats)
        except Exception as err:
            log.debug("metrics: no fresh replica stats: %s: %s", type(err).__name__, err)
        return Response(prometheus.get().render(), media_type=prometheus.CONTENT_TYPE)
