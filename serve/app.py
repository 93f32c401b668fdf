"""The ddft Ray Serve application: an HTTP gateway in front of model replicas (one base each).

    serve run serve.app:build_app config=jobs/configs/demo.yaml     # or: serve run serve/config.yaml

Note: no `from __future__ import annotations` here: FastAPI must see the real `Request` type
through Serve's class-based routes.

A thin shell over the library: media decoding (ddft.data.media), adapter resolution
(ddft.adapters.registry), prompts and generation (ddft.engines), recipe parsing (ddft.recipes).
The gateway decodes uploads in a child process, so a video that crashes the decoder costs a 422,
never a replica. Model replicas batch concurrent requests (mixing adapters in one forward) and
use Serve multiplexing so a request goes to a replica that already holds its adapter.
"""

import asyncio
import base64
import binascii
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ddft import config as ddft_config
from ddft.adapters import registry
from ddft.adapters.registry import AdapterError, Manifest
from ddft.data.media import MediaError, load_image, sample_frames
from ddft.engines.base import GenerateRequest, GenerateResult, make_engine
from ddft.models.load import base_info
from ddft.prompts import QUESTIONS
from ddft.store import Store, StoreError

log = logging.getLogger("ddft.serve")

MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # videos and images, uploaded or read from the store
DECODE_TIMEOUT_S = 60.0
GENERATE_TIMEOUT_S = 600.0
RESOLVE_TTL_S = 5.0  # adapter resolution is cached this long (a new version shows up after it)
MAX_BATCH = 8
FRAMES = 8


# -- errors -----------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        self.status, self.error, self.detail = status, error, detail
        super().__init__(f"{status} {error}: {detail}")


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


api = FastAPI(title="ddft", description="Directed Domain Fine-Tuning of Video-LLaVA: one adapter per modality")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return _error(exc.status, exc.error, exc.detail)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    detail = (f"no route {request.method} {request.url.path}: the API has POST /v1/recipes, POST /v1/generate, "
              "GET /v1/models and GET /healthz") if exc.status_code in codes else str(exc.detail)
    return _error(exc.status_code, codes.get(exc.status_code, "http_error"), detail)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error(400, "bad_request", str(exc.errors())[:500])


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, "internal_error", f"{type(exc).__name__}: {str(exc)[:300]} (see the replica's log)")


# -- decoding in a child process ------------------------------------------------------------------
def _decode(kind: str, data: bytes):
    """Runs in the decoder process: ("ok", array) or ("error", reason, message); never raises."""
    try:
        return ("ok", sample_frames(data, FRAMES) if kind == "video" else load_image(data))
    except MediaError as err:
        return ("error", err.reason, str(err))
    except Exception as err:  # a decoder bug on odd input is still a bad file, not a server fault
        return ("error", "undecodable_" + kind, f"{type(err).__name__}: {str(err)[:200]}")


def _warm() -> bool:
    return True


class Decoder:
    """A one-process pool for media decoding; rebuilt if a file kills or hangs the decoder."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None

    def _get(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _reset(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):  # a hung decoder must go
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def warm(self, timeout: float = 120.0) -> None:
        """Start the decoder process now, so the first upload doesn't wait for it."""
        self._get().submit(_warm).result(timeout=timeout)

    async def __call__(self, kind: str, data: bytes):
        loop = asyncio.get_running_loop()
        try:
            out = await asyncio.wait_for(loop.run_in_executor(self._get(), _decode, kind, data), DECODE_TIMEOUT_S)
        except BrokenProcessPool:
            self._reset()
            raise ApiError(422, f"undecodable_{kind}", f"the {kind} crashed the decoder: it is damaged or not "
                           f"a supported format; re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4)") from None
        except asyncio.TimeoutError:
            self._reset()
            raise ApiError(422, f"undecodable_{kind}", f"decoding the {kind} took over {DECODE_TIMEOUT_S:.0f}s; "
                           "send a shorter or re-encoded file") from None
        if out[0] == "error":
            _, reason, message = out
            wanted = (f"a video (mp4, webm, mov ...) of at least {FRAMES} frames" if kind == "video"
                      else "a JPEG, PNG or WebP image")
            raise ApiError(422, reason, f"{message}; send {wanted}")
        return out[1]


# -- model replicas -------------------------------------------------------------------------------
class ModelServer:
    """One engine (one base) per replica. Concurrent calls are batched, mixing adapters."""

    def __init__(self, store: Store, base_id: str, cache_size: int = 8, device: str = "cpu", engine: str = "hf"):
        self.engine = make_engine(engine, store=store, base_model_id=base_id, cache_size=cache_size, device=device)
        self._manifests: dict[str, Manifest] = {}

    async def load_adapter(self, ref: str) -> str:
        """The multiplexed loader (wrapped by serve.multiplexed in build_app): Serve routes a request
        to a replica that holds its adapter; the engine's LRU holds the weights."""
        await asyncio.to_thread(self.engine.load_adapter, self._manifests[ref])
        return ref

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[tuple[GenerateRequest, float]]) -> list[GenerateResult]:
        started = time.perf_counter()
        results = await asyncio.to_thread(self.engine.generate, [r for r, _ in requests])
        for res, (_, queued) in zip(results, requests):
            res.timings["queue_s"] = round(started - queued, 4)
        return results

    async def generate(self, request: GenerateRequest) -> dict:
        """{"result": GenerateResult as a dict} or {"status", "error", "detail"}: errors travel as data."""
        try:
            if request.adapter is not None:
                self._manifests[request.adapter.ref] = request.adapter
                await self.load_adapter(request.adapter.ref)
            return {"result": asdict(await self._batched((request, time.perf_counter())))}
        except AdapterError as err:
            return {"status": 409, "error": "adapter_unusable", "detail": str(err)}
        except StoreError as err:
            return {"status": 502, "error": "store_error", "detail": str(err)}
        except ValueError as err:
            return {"status": 400, "error": "bad_request", "detail": str(err)}
        except Exception as err:
            log.exception("generation failed")
            return {"status": 500, "error": "generation_failed", "detail": f"{type(err).__name__}: {str(err)[:300]}"}

    def info(self) -> dict:
        return {"base": self.engine.base_id, "loaded_adapters": self.engine.loaded_adapters()}


# -- the HTTP gateway -----------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class Gateway:
    def __init__(self, model: DeploymentHandle, cfg: ddft_config.PipelineConfig, store: Store):
        self.model, self.cfg, self.store = model, cfg, store
        self.base_id = cfg.base.id
        self.decode = Decoder()
        self.decode.warm()
        self._resolved: dict[tuple, tuple[float, Manifest | None]] = {}

    # helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def _tenant(request: Request) -> str | None:
        tenant = request.headers.get("x-tenant") or None
        if tenant is not None:
            try:
                registry.adapter_prefix(f"tenant-{tenant}", "x")
            except AdapterError:
                raise ApiError(400, "bad_tenant", f"X-Tenant {tenant[:80]!r} is not a tenant id: use lowercase "
                               "letters, digits, '.', '_' or '-'") from None
        return tenant

    @staticmethod
    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "bad_json", "the body is not valid JSON; send Content-Type: application/json "
                           "with a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", f"the body must be a JSON object, got {type(body).__name__}")
        return body

    @staticmethod
    def _check_length(request: Request) -> None:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_UPLOAD_BYTES + 1024 * 1024:
            raise ApiError(413, "too_large", f"the request is {int(length) / 2**20:.0f} MB; the limit is "
                           f"{MAX_UPLOAD_BYTES // 2**20} MB: trim or re-encode the file, or upload it to the store "
                           "and send its URI")

    @staticmethod
    def _check_size(data: bytes, what: str) -> bytes:
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, "too_large", f"the {what} is {len(data) / 2**20:.0f} MB; the limit is "
                           f"{MAX_UPLOAD_BYTES // 2**20} MB: trim or re-encode it")
        return data

    def _store_key(self, uri) -> str:
        if not isinstance(uri, str) or not uri.strip():
            raise ApiError(400, "bad_uri", "give the media as a store key (datasets/raw/...) or a URI inside "
                           f"the store {self.store.uri}")
        uri = uri.strip()
        if "://" in uri:
            root = self.store.uri.rstrip("/") + "/"
            if not uri.startswith(root):
                raise ApiError(400, "uri_outside_store", f"{uri[:200]} is outside this server's store {self.store.uri}: "
                               "upload the file instead, or copy it into the store and send its key")
            uri = uri[len(root):]
        try:
            self.store.url(uri)  # validates the key
        except StoreError as err:
            raise ApiError(400, "bad_uri", str(err)) from None
        return uri

    async def _read_store(self, uri) -> bytes:
        key = self._store_key(uri)
        local = self.store.local_path(key)
        if local is not None and local.is_file() and local.stat().st_size > MAX_UPLOAD_BYTES:
            raise ApiError(413, "too_large", f"{self.store.url(key)} is over {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            data = await asyncio.to_thread(self.store.read_bytes, key)
        except StoreError as err:
            if "not found" in str(err):
                raise ApiError(404, "not_found", str(err)) from None
            raise ApiError(502, "store_error", str(err)) from None
        return self._check_size(data, "file")

    async def _resolve(self, modality: str, tenant: str | None, explicit) -> Manifest | None:
        """The adapter for a request (DESIGN.md's order); `explicit` may be "name", "name/vN",
        "owner/name/vN" or "<base>:owner/name/vN" (a /v1/models id)."""
        if explicit is not None and (not isinstance(explicit, str) or not explicit.strip()):
            raise ApiError(400, "bad_adapter", "adapter must be a name like 'video', 'video/v1' or 'ddft/video/v1'")
        if isinstance(explicit, str):
            explicit = explicit.strip().removeprefix(self.base_id + ":")
        key = (modality, tenant, explicit)
        hit = self._resolved.get(key)
        if hit and time.monotonic() - hit[0] < RESOLVE_TTL_S:
            return hit[1]
        try:
            manifest = await asyncio.to_thread(self._lookup, modality, tenant, explicit)
        except AdapterError as err:
            raise ApiError(404, "unknown_adapter", str(err)) from None
        except (StoreError, ValueError) as err:
            raise ApiError(400, "bad_adapter", str(err)) from None
        if manifest is not None and manifest.modality != modality:
            raise ApiError(400, "adapter_modality", f"adapter {manifest.ref} is for {manifest.modality} requests, "
                           f"this one is {modality}")
        self._resolved[key] = (time.monotonic(), manifest)
        return manifest

    def _lookup(self, modality: str, tenant: str | None, explicit: str | None) -> Manifest | None:
        if explicit is None or explicit.count("/") != 2:
            return registry.resolve(self.store, modality, tenant, explicit)
        owner, name, version = explicit.split("/")  # a full ref: that owner exactly
        allowed = {registry.PLATFORM_OWNER} | ({f"tenant-{tenant}"} if tenant else set())
        if not version[1:].isdigit() or version[0] != "v":
            raise ValueError(f"adapter {explicit!r}: the version is written v<N>, e.g. ddft/video/v1")
        manifest = registry.read_manifest(self.store, owner, name, int(version[1:])) if owner in allowed else None
        if manifest is None:
            raise AdapterError(f"no adapter {explicit!r} for {'tenant ' + tenant if tenant else 'the platform'}; "
                               "GET /v1/models lists what is available")
        return manifest

    async def _generate(self, request: GenerateRequest) -> dict:
        handle = self.model
        if request.adapter is not None:
            handle = handle.options(multiplexed_model_id=request.adapter.ref)
        try:
            out = await asyncio.wait_for(handle.generate.remote(request), GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"generation took over {GENERATE_TIMEOUT_S:.0f}s; retry, or lower "
                           "max_new_tokens") from None
        if "error" in out:
            raise ApiError(out["status"], out["error"], out["detail"])
        return out["result"]

    @staticmethod
    def _engine_timings(result: dict) -> dict:
        t = result["timings"]
        return {k: t[k] for k in ("queue_s", "batch_size", "adapters_in_batch", "new_tokens") if k in t}

    def _max_tokens(self, body: dict) -> int:
        cap = self.cfg.serve.max_new_tokens
        value = body.get("max_new_tokens", cap)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= cap:
            raise ApiError(400, "bad_max_new_tokens", f"max_new_tokens must be an integer from 1 to {cap}")
        return value

    @staticmethod
    def _temperature(body: dict) -> float:
        value = body.get("temperature", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
            raise ApiError(400, "bad_temperature", "temperature must be a number from 0 (greedy) to 2")
        return float(value)

    # routes ----------------------------------------------------------------------------------------
    @api.post("/v1/recipes")
    async def recipes(self, request: Request):
        """A cooking video (multipart field `video`, or JSON {"video_uri": ...}) -> its recipe."""
        from ddft.recipes import parse_recipe

        t0 = time.perf_counter()
        tenant = self._tenant(request)
        ctype = request.headers.get("content-type", "")
        body: dict = {}
        if ctype.startswith("multipart/form-data"):
            self._check_length(request)
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("video")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "missing_video", "send the video as a multipart file field named 'video' "
                               "(curl -F video=@clip.mp4 ...), or JSON {\"video_uri\": \"<store key or URI>\"}")
            data = self._check_size(await upload.read(), "video")
            body = {k: v for k, v in form.items() if k in ("adapter", "max_new_tokens") and isinstance(v, str)}
            if "max_new_tokens" in body:  # form fields are strings
                body["max_new_tokens"] = int(body["max_new_tokens"]) if body["max_new_tokens"].isdigit() else -1
        elif ctype.startswith("application/json"):
            body = await self._json(request)
            if "video_uri" not in body:
                raise ApiError(400, "missing_video", "JSON requests give {\"video_uri\": \"<store key or URI>\"}; "
                               "or upload the file as multipart field 'video'")
            data = await self._read_store(body["video_uri"])
        else:
            raise ApiError(400, "unsupported_content_type", f"Content-Type {ctype[:80]!r}: upload multipart/form-data "
                           "with a 'video' file, or send application/json with video_uri")
        max_tokens = self._max_tokens(body)
        manifest = await self._resolve("video", tenant, body.get("adapter"))
        t1 = time.perf_counter()
        frames = await self.decode("video", data)
        t2 = time.perf_counter()
        result = await self._generate(GenerateRequest("video", QUESTIONS["video"], frames, manifest, max_tokens,
                                                      self._temperature(body)))
        t3 = time.perf_counter()
        recipe = parse_recipe(result["text"])
        return {"ingredients": recipe["ingredients"], "steps": recipe["steps"], "text": result["text"],
                "adapter": result["adapter"], "base": result["base"],
                "timings": {"decode_s": round(t2 - t1, 4), "generate_s": round(t3 - t2, 4),
                            "total_s": round(t3 - t0, 4), **self._engine_timings(result)}}

    @api.post("/v1/generate")
    async def generate(self, request: Request):
        """{"modality": "text"|"image", "question", "image_b64" | "image_uri"} -> the answer."""
        t0 = time.perf_counter()
        tenant = self._tenant(request)
        self._check_length(request)
        body = await self._json(request)
        modality = body.get("modality")
        if modality == "video":
            raise ApiError(400, "bad_modality", "videos go to POST /v1/recipes (multipart 'video' or video_uri)")
        if modality not in ("text", "image"):
            raise ApiError(400, "bad_modality", f"modality {str(modality)[:40]!r}: use \"text\" or \"image\"")
        question = body.get("question", QUESTIONS.get(modality))
        if not isinstance(question, str) or not question.strip():
            raise ApiError(400, "missing_question", "give a non-empty \"question\" string"
                           + (" (image questions default to the dish question)" if modality == "image" else ""))
        pixels, decode_s = None, 0.0
        if modality == "image":
            given = [k for k in ("image_b64", "image_uri") if body.get(k) is not None]
            if len(given) != 1:
                raise ApiError(400, "missing_image", "give exactly one of image_b64 (base64 of the file) or "
                               "image_uri (a store key or URI)")
            if given[0] == "image_b64":
                if not isinstance(body["image_b64"], str):
                    raise ApiError(400, "bad_image_b64", "image_b64 must be a base64 string")
                try:
                    data = base64.b64decode(body["image_b64"], validate=True)
                except (binascii.Error, ValueError):
                    raise ApiError(400, "bad_image_b64", "image_b64 is not valid base64 (standard alphabet, "
                                   "padded); e.g. base64.b64encode(open(path, 'rb').read()).decode()") from None
                data = self._check_size(data, "image")
            else:
                data = await self._read_store(body["image_uri"])
            t = time.perf_counter()
            pixels = await self.decode("image", data)
            decode_s = time.perf_counter() - t
        elif body.get("image_b64") is not None or body.get("image_uri") is not None:
            raise ApiError(400, "bad_request", "a text request carries no image; use modality \"image\"")
        manifest = await self._resolve(modality, tenant, body.get("adapter"))
        t1 = time.perf_counter()
        result = await self._generate(GenerateRequest(modality, question.strip(), pixels, manifest,
                                                      self._max_tokens(body), self._temperature(body)))
        t2 = time.perf_counter()
        return {"answer": result["text"], "adapter": result["adapter"], "base": result["base"],
                "timings": {"decode_s": round(decode_s, 4), "generate_s": round(t2 - t1, 4),
                            "total_s": round(t2 - t0, 4), **self._engine_timings(result)}}

    @api.get("/v1/models")
    async def models(self, request: Request):
        """OpenAI-style: the base, and `<base>:<adapter ref>` for each adapter made for it."""
        tenant = self._tenant(request)
        owners = {registry.PLATFORM_OWNER} | ({f"tenant-{tenant}"} if tenant else set())
        try:
            manifests = await asyncio.to_thread(registry.list_adapters, self.store)
        except StoreError as err:
            raise ApiError(502, "store_error", str(err)) from None
        data = [{"id": self.base_id, "object": "model", "owned_by": registry.PLATFORM_OWNER, "root": self.base_id}]
        for m in manifests:
            if m.owner in owners and m.base_model_id == self.base_id:
                data.append({"id": f"{self.base_id}:{m.ref}", "object": "model", "owned_by": m.owner,
                             "root": self.base_id, "parent": self.base_id, "modality": m.modality,
                             "adapter": m.ref, "created_at": m.created_at})
        return {"object": "list", "data": data}

    @api.get("/healthz")
    async def healthz(self):
        try:
            info = await asyncio.wait_for(self.model.info.remote(), 10)
        except Exception as err:
            return _error(503, "unhealthy", f"the model replica did not answer: {type(err).__name__}: {str(err)[:200]}")
        return {"status": "ok", **info}


# -- the application builder ----------------------------------------------------------------------
def _model_deployment(cfg: ddft_config.PipelineConfig):
    """ModelServer with Serve multiplexing sized to the adapter cache.

    The subclass is made here (not importable by name), so Ray ships it by value with the
    configured `max_num_models_per_replica`.
    """
    s = cfg.serve
    cls = type("ConfiguredModelServer", (ModelServer,), {
        "load_adapter": serve.multiplexed(max_num_models_per_replica=s.adapter_cache_size)(ModelServer.load_adapter)})
    return serve.deployment(
        cls, name="ModelServer", num_replicas=s.num_replicas, max_ongoing_requests=4 * MAX_BATCH,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica})


def build_app(args: dict):
    """Ray Serve application builder: args = {"config": "<PipelineConfig YAML>"}.

    The config is validated first (ConfigError lists every problem) and the base must be in the
    store, before any Serve work starts.
    """
    args = dict(args or {})
    path = args.pop("config", None)
    problems = [f"{k}: unknown argument (value {v!r}); the only argument is config" for k, v in args.items()]
    if not path:
        problems.append("config: required; e.g. serve run serve.app:build_app config=jobs/configs/demo.yaml")
    if problems:
        raise ddft_config.ConfigError("serve arguments", problems)
    cfg = ddft_config.load(Path(path))
    store = Store.from_config(cfg.store)
    base_info(store, cfg.base.id)  # StoreError naming the fix when the base is missing
    s = cfg.serve
    model = _model_deployment(cfg).bind(store, cfg.base.id, s.adapter_cache_size,
                                        "cuda" if s.gpus_per_replica > 0 else "cpu")
    return Gateway.bind(model, cfg, store)


def run(config_path: str | Path, blocking: bool = False) -> str:
    """Start Serve on the config's host/port, deploy the app, return its base URL (the demo's path)."""
    cfg = ddft_config.load(Path(config_path))
    app = build_app({"config": str(config_path)})
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name="ddft", route_prefix="/", blocking=blocking)
    return f"http://{cfg.serve.host}:{cfg.serve.port}"
