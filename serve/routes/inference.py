"""Inference routes: recipes, answers, OpenAI's chat and text completions, and the models a caller
may name. Each turns its typed body into a GenerateRequest and a Rendering; serve/pipeline.py does
the rest (JSON or SSE, n choices, timings).

Routing (DESIGN.md): an adapter named explicitly (the caller's or the platform's) -> the caller's
adapter for the modality -> the platform's DDFT adapter for it -> the base. Every answer says which
adapter and base answered. Media is decoded here in a child process, as its adapter was trained to
see it (serve/decoder.py Sampling).
"""

import asyncio
import time
from datetime import datetime

from fastapi import Path, Query, Request

from ddft.adapters import registry
from ddft.adapters.ref import AdapterRef, model_adapter, model_id
from ddft.adapters.registry import Manifest
from ddft.engines.base import Chunk, GenerateRequest, GenerateResult
from ddft.engines.grammar import Constraint
from ddft.errors import BadArgument, NotFound, UnsupportedFormat
from ddft.prompts import QUESTIONS
from ddft.recipes import read_recipe
from serve import answers, bodies, inputs, sse
from serve import openapi_docs as docs
from serve.api import route
from serve.decoder import Sampling
from serve.errors import body as error_body
from serve.openai import OpenAIRendering, chat_input
from serve.pipeline import Clock, Rendering, answer

MB = inputs.MB
RESOLVE_TTL_S = 2.0  # other gateways' uploads and deletes show up after this; our own at once
VIDEO_FILE = {"video": {"type": "string", "format": "binary"}}


class RecipeRendering(Rendering):
    """A RecipeAnswer; streamed, `delta` events ({"text"}) then one `recipe` event, or an `error` event."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def whole(self, results: list[GenerateResult]) -> answers.RecipeAnswer:
        result = results[0]
        recipe = read_recipe(result.text, cut=result.finish_reason != "stop")
        return answers.RecipeAnswer(
            **recipe.model_dump(),
            text=result.text,
            adapter=result.adapter,
            base=result.base,
            finish_reason="stop" if result.finish_reason == "stop" else "length",
            timings=self.clock.timings(result),
        )

    def events(self, chunk: Chunk) -> list[str]:
        return ([sse.event({"text": chunk.text}, "delta")] if chunk.text else []) + (
            [sse.event(self.whole([chunk.result]).model_dump(mode="json"), "recipe")] if chunk.result else []
        )

    def error_event(self, err) -> str:
        return sse.event(error_body(err), "error")


class AnswerRendering(Rendering):
    def __init__(self, clock: Clock):
        self.clock = clock

    def whole(self, results: list[GenerateResult]) -> answers.GenerateAnswer:
        r = results[0]
        return answers.GenerateAnswer(
            answer=r.text, adapter=r.adapter, base=r.base, finish_reason=r.finish_reason, timings=self.clock.timings(r)
        )


class InferenceRoutes:
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

    @property
    def _media_limit(self) -> int:
        return int(self.s.max_media_mb * MB)

    @property
    def _json_limit(self) -> int:
        """A JSON body's cap when it may carry the medium as base64 (image_b64, a data: URL)."""
        return self._media_limit * 4 // 3 + MB

    async def _media(self, kind: str, data: bytes | None, uri, manifest: Manifest | None, clock: Clock):
        """Decoded pixels, from bytes or a store key/URI, sampled as the adapter was trained to see."""
        if data is None:
            data = await inputs.read_store(self.store, uri, self._media_limit, self.s.media_prefixes)
        inputs.check_size(data, self._media_limit, kind)
        t = time.perf_counter()
        pixels = await self.decode(kind, data, Sampling.of(manifest))
        clock.decode_s = time.perf_counter() - t
        return pixels

    @route(
        "post",
        "/v1/recipes",
        response_model=answers.RecipeAnswer,
        responses=docs.streamed('event: delta / data: {"text"}; event: recipe / data: <the JSON answer>'),
        openapi_extra=docs.body(bodies.RecipeJson, form=docs.multipart(bodies.RecipeForm, ("video",), **VIDEO_FILE)),
    )
    async def recipes(
        self,
        request: Request,
        stream: str | None = Query(
            None,
            description="true: answer as server-sent events: `delta` events {text} as the recipe is "
            "written, then one `recipe` event (the JSON answer), or an `error` event",
            json_schema_extra={"enum": ["true", "false"]},
        ),
    ):
        """A cooking video (multipart field `video`, or JSON {"video_uri": ...}) -> its recipe; with
        ?stream=true as SSE: `delta` events ({"text"}) as it is written, then a `recipe` event. The
        model writes under the recipe grammar (ddft.recipes), so the answer is a RecipeAnswer."""
        clock = Clock()
        tenant = await self.auth.tenant(request)
        request.state.modality = "video"
        streaming = inputs.flag(stream, "stream")
        ctype = request.headers.get("content-type", "")
        data = uri = None
        if ctype.startswith("multipart/form-data"):
            await inputs.bounded(request, self._media_limit + MB, "video")
            form = await request.form(max_files=1, max_fields=inputs.FORM_FIELDS)
            upload = form.get("video")
            if upload is None or isinstance(upload, str):
                raise BadArgument(
                    "send the video as a multipart file field named 'video' "
                    '(curl -F video=@clip.mp4 ...), or JSON {"video_uri": "<store key or URI>"}',
                    "missing_video",
                )
            data = inputs.check_size(await upload.read(), self._media_limit, "video")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            body = bodies.parse(bodies.RecipeForm, fields, self.limits)
        elif ctype.startswith("application/json"):
            # a URI: no media in the body, so the small cap
            body = bodies.parse(bodies.RecipeJson, await inputs.json_body(request), self.limits)
            uri = body.video_uri
        else:
            raise UnsupportedFormat(
                f"Content-Type {ctype[:80]!r}: upload multipart/form-data "
                "with a 'video' file, or send application/json with video_uri",
                "unsupported_media_type",
            )
        manifest = await self._resolve(request, "video", tenant, body.adapter)
        pixels = await self._media("video", data, uri, manifest, clock)
        settings = body.generation(self.s.max_new_tokens)
        gen = GenerateRequest("video", QUESTIONS["video"], pixels, manifest, constraint=Constraint.recipe(), **settings)
        return await answer(self.replicas, gen, RecipeRendering(clock), clock, stream=streaming)

    @route(
        "post",
        "/v1/generate",
        response_model=answers.GenerateAnswer,
        responses=docs.errors(),
        openapi_extra=docs.body(bodies.Generate),
    )
    async def generate(self, request: Request):
        """{"modality": "text"|"image", "question", "image_b64" | "image_uri"} -> the answer."""
        clock = Clock()
        tenant = await self.auth.tenant(request)
        raw = await inputs.json_body(request, self._json_limit)
        body = bodies.parse(bodies.Generate, raw, self.limits)
        manifest = await self._resolve(request, body.modality, tenant, body.adapter)
        pixels = None
        if body.modality == "image":
            pixels = await self._media("image", body.image(), body.image_uri, manifest, clock)
        question = (body.question or QUESTIONS[body.modality]).strip()
        gen = GenerateRequest(body.modality, question, pixels, manifest, **body.generation(self.s.max_new_tokens))
        return await answer(self.replicas, gen, AnswerRendering(clock), clock)

    @route(
        "post",
        "/v1/chat/completions",
        response_model=answers.ChatCompletion,
        responses=docs.streamed("data: <chat.completion.chunk>, as OpenAI streams them", openai=True),
        openapi_extra=docs.body(bodies.Chat),
    )
    async def chat_completions(self, request: Request):
        """OpenAI-compatible; `model` is the base id or "<base>:<adapter>"; text, image_url, video_url;
        the conversation goes through the base's chat template turn by turn; "stream": true answers
        with chat.completion.chunk events (SSE)."""
        clock = Clock()
        tenant = await self.auth.tenant(request)
        raw = await inputs.json_body(request, self._json_limit)
        chat = bodies.parse(bodies.Chat, raw, self.limits)
        adapter = model_adapter(chat.model, self.base_id)
        conversation = chat_input(chat)
        manifest = await self._resolve(request, conversation.modality, tenant, adapter)
        pixels = None
        if conversation.modality != "text":
            pixels = await self._media(
                conversation.modality, conversation.media, conversation.media_uri, manifest, clock
            )
        settings = chat.generation(self.s.max_new_tokens)
        gen = GenerateRequest(
            conversation.modality, conversation.question, pixels, manifest, history=conversation.history, **settings
        )
        out = OpenAIRendering(self._model_id(manifest), chat.include_usage, logprobs=bool(chat.logprobs))
        return await answer(self.replicas, gen, out, clock, stream=bool(chat.stream), n=chat.n or 1)

    @route(
        "post",
        "/v1/completions",
        response_model=answers.TextCompletion,
        responses=docs.streamed("data: <text_completion chunk>, as OpenAI streams them", openai=True),
        openapi_extra=docs.body(bodies.Completion),
    )
    async def completions(self, request: Request):
        """OpenAI-compatible text completions: the prompt is continued as it is (no chat template);
        `model` is the base id or "<base>:<adapter>" (a text adapter); "stream": true as OpenAI streams."""
        clock = Clock()
        tenant = await self.auth.tenant(request)
        req = bodies.parse(bodies.Completion, await inputs.json_body(request, MB), self.limits)
        manifest = await self._resolve(request, "text", tenant, model_adapter(req.model, self.base_id))
        gen = GenerateRequest("text", req.text, None, manifest, raw=True, **req.generation(self.s.max_new_tokens))
        out = OpenAIRendering(self._model_id(manifest), req.include_usage, text=True, logprobs=req.logprobs is not None)
        return await answer(self.replicas, gen, out, clock, stream=bool(req.stream), n=req.n or 1)

    def _model_id(self, manifest: Manifest | None) -> str:
        return model_id(self.base_id, manifest.ref if manifest else None)

    async def _model_objects(self, request: Request) -> list[answers.ModelObject]:
        """OpenAI model objects: the base, and `<base>:<adapter ref>` for each adapter the caller may use."""
        owners = registry.visible_owners(await self.auth.tenant(request))

        def visible() -> list[Manifest]:  # the caller's and the platform's folders, never the whole store
            return [m for owner in sorted(owners) for m in registry.list_adapters(self.store, owner)]

        manifests = await asyncio.to_thread(visible)
        base = answers.ModelObject(
            id=self.base_id, created=self.started, owned_by=registry.PLATFORM_OWNER, root=self.base_id
        )
        return [base] + [
            answers.ModelObject(
                id=self._model_id(m),
                created=_unix(m.created_at, self.started),
                owned_by=m.owner,
                root=self.base_id,
                parent=self.base_id,
                modality=m.modality,
                adapter=m.ref,
                created_at=m.created_at,
            )
            for m in manifests
            if m.base_fingerprint == self.spec.fingerprint
        ]

    @route("get", "/v1/models", response_model=answers.ModelList, responses=docs.errors(openai=True))
    async def models(self, request: Request):
        """OpenAI-style: the base, and `<base>:<adapter ref>` for each adapter the caller may use."""
        return answers.ModelList(data=await self._model_objects(request))

    @route("get", "/v1/models/{model_id:path}", response_model=answers.ModelObject, responses=docs.errors(openai=True))
    async def get_model(self, request: Request, model_id: str = Path(description="a model id of GET /v1/models")):
        """One model object; 404 for a model that isn't served or the caller may not use (the same)."""
        for obj in await self._model_objects(request):
            if obj.id == model_id:
                return obj
        raise NotFound(
            f"model {model_id[:100]!r} is not served here for this caller; GET /v1/models lists them", "model_not_found"
        )


def _unix(iso: str, default: int) -> int:
    """An ISO time (a manifest's created_at) as unix seconds."""
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except (TypeError, ValueError):
        return default
