"""JSON errors for every route: {"error": <short code>, "detail": <what was wrong and the fix>}, and
OpenAI's shape {"error": {"message", "type", "code", "param"}} on the OpenAI routes, so OpenAI
clients show the message and code. The library's typed errors (ddft.errors: what kind of problem,
with a code) map to HTTP here, in one table, wherever they are raised (the gateway, the registry,
an engine on a replica) and for the plain and the streamed (SSE) answers alike."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ddft.errors import BadArgument, Conflict, DdftError, Invalid, NotFound, TooLarge, Unavailable, UnsupportedFormat
from ddft.store import StoreError

log = logging.getLogger("ddft.serve")

# A kind of error -> its HTTP status; the first match wins (subclasses before their bases). The
# code is the error's own. A plain ValueError from an engine is a bad request.
STATUS = (
    (TooLarge, 413),
    (UnsupportedFormat, 415),
    (BadArgument, 400),
    (Invalid, 422),
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
)
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")

ROUTES = (
    "POST /v1/recipes, POST /v1/generate, POST /v1/chat/completions, POST /v1/completions, "
    "GET /v1/models[/{id}], "
    "PUT|GET|DELETE /v1/adapters/{name}, GET /healthz, GET /metrics"
)


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        self.status, self.error, self.detail, self.headers = status, error, detail, headers
        super().__init__(f"{status} {error}: {detail}")


def store_unreadable(err: StoreError) -> ApiError:
    """A store failure as a client sees it: the details (URIs, endpoints, buckets) go to the log only."""
    log.error("store error: %s", err)
    return ApiError(
        502,
        "store_error",
        "the server could not use its store; try again, or ask the operator (the server's log has the details)",
    )


def status_of(err: DdftError) -> int:
    return next(status for kind, status in STATUS if isinstance(err, kind))


def from_error(err: BaseException) -> ApiError | None:
    """The HTTP error for a typed library error (or a store failure); None for anything else."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, StoreError):
        return store_unreadable(err)
    if isinstance(err, DdftError):
        status = status_of(err)
        return ApiError(status, err.code, err.detail, {"Retry-After": "30"} if status == 503 else None)
    return None


def from_engine(err: BaseException) -> ApiError:
    """The HTTP error for what a model replica raised. Ray re-raises a replica's exception as a
    RayTaskError that is also an instance of the original type; its `cause` is the original,
    whose message (never the traceback Ray adds) is the detail."""
    if isinstance(err, ApiError):
        return err
    cause = getattr(err, "cause", None) or err
    if (known := from_error(cause)) is not None:
        return known
    if isinstance(cause, ValueError):
        return ApiError(400, "bad_request", str(cause))
    log.error("generation failed: %s: %s", type(cause).__name__, str(cause)[:2000])
    return ApiError(500, "generation_failed", f"{type(cause).__name__}: {str(cause)[:300]} (see the replica's log)")


def _openai_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def body(status: int, error: str, detail: str, path: str = "") -> dict:
    """The error object for a route: OpenAI's shape on the OpenAI routes, ours elsewhere."""
    if path.startswith(OPENAI_ROUTES):
        return {"error": {"message": detail, "type": _openai_type(status), "code": error, "param": None}}
    return {"error": error, "detail": detail}


def error_response(status: int, error: str, detail: str, headers: dict | None = None, path: str = "") -> JSONResponse:
    return JSONResponse(body(status, error, detail, path), status_code=status, headers=headers)


def busy(detail: str, retry_after_s: int = 2) -> ApiError:
    """503 with Retry-After: the bounded queue is full or a replica is being replaced."""
    return ApiError(503, "overloaded", detail, headers={"Retry-After": str(retry_after_s)})


def _methods(request: Request) -> list[str]:
    from starlette.routing import Match

    methods = set()
    for route in request.app.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


def client_went_away(exc: BaseException) -> bool:
    """A disconnect surfacing as an exception: Serve cancels the request's task when its client goes
    away (TaskCancelledError, seen through Starlette's middleware when a stream's reader leaves)."""
    from ray.exceptions import TaskCancelledError
    from starlette.requests import ClientDisconnect

    return isinstance(exc, (TaskCancelledError, ClientDisconnect))


def install(api: FastAPI) -> None:
    """Every error leaves the app as JSON, never as an HTML page or a stack trace."""

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers, request.url.path)

    @api.exception_handler(DdftError)
    @api.exception_handler(StoreError)
    async def _typed_error(request: Request, exc: Exception):
        err = from_error(exc)
        return error_response(err.status, err.error, err.detail, err.headers, request.url.path)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = (
            f"no route {request.method} {request.url.path}: the API has {ROUTES}"
            if exc.status_code in codes
            else str(exc.detail)
        )
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Allow: every method of the path (Starlette names only one route's)
            headers = {**(headers or {}), "Allow": ", ".join(_methods(request))}
        return error_response(
            exc.status_code, codes.get(exc.status_code, "http_error"), detail, headers=headers, path=request.url.path
        )

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, "bad_request", str(exc.errors())[:500], path=request.url.path)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if client_went_away(exc):  # a client that disconnects mid-stream is normal, not an error
            log.info("client went away during %s %s", request.method, request.url.path)
            return error_response(
                499, "client_closed_request", "the client closed the connection", path=request.url.path
            )
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            "internal_error",
            f"an unexpected {type(exc).__name__} (the server's log has the details)",
            path=request.url.path,
        )
