"""JSON errors for every route: {"error": <short code>, "detail": <what was wrong and the fix>}, and
OpenAI's shape {"error": {"message", "type", "code", "param"}} on the OpenAI routes, so OpenAI
clients show the message and code.

Everything in serve/ raises a kind of error: the library's (ddft.errors: what kind of problem, with
a code) or the serve kinds below. They map to HTTP here, in one table (`STATUS`, read by `to_http`),
wherever they are raised (a route, the registry, an engine on a replica) and for the plain and
the streamed (SSE) answers alike.
"""

import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ddft.errors import BadArgument, Conflict, DdftError, Invalid, NotFound, TooLarge, Unavailable, UnsupportedFormat
from ddft.store import StoreError

log = logging.getLogger("ddft.serve")


# -- the serve kinds, beside the library's ----------------------------------------------------------
class Unauthorized(DdftError):
    """No key, or a key that names nobody."""

    default_code = "unauthorized"


class Forbidden(DdftError):
    """A key that may not do this."""

    default_code = "forbidden"


class Overloaded(Unavailable):
    """Every queue is full, or a replica is being replaced: retry after `retry_after_s`."""

    default_code = "overloaded"

    def __init__(self, detail: str, retry_after_s: int = 2, code: str | None = None):
        super().__init__(detail, code)
        self.retry_after_s = retry_after_s


class Timeout(DdftError):
    """The answer took longer than serve.request_timeout_s."""

    default_code = "timeout"


class GenerationFailed(DdftError):
    """A model replica failed in a way that is not the request's fault (its log has the details)."""

    default_code = "generation_failed"


class MethodNotAllowed(DdftError):
    """The path exists, not with this method; `allow` lists its methods."""

    default_code = "method_not_allowed"

    def __init__(self, detail: str, allow: list[str]):
        super().__init__(detail)
        self.allow = allow


class ClientClosed(DdftError):
    """The client went away before its answer was made."""

    default_code = "client_closed_request"


# A kind of error -> its HTTP status; the first match wins (subclasses before their bases). The
# code is the error's own. Nothing else in serve/ chooses a status.
STATUS = (
    (TooLarge, 413),
    (UnsupportedFormat, 415),
    (BadArgument, 400),
    (Invalid, 422),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (MethodNotAllowed, 405),
    (Conflict, 409),
    (ClientClosed, 499),
    (Unavailable, 503),
    (Timeout, 504),
    (GenerationFailed, 500),
    (StoreError, 502),
)
RETRY_AFTER_S = 30  # an Unavailable's Retry-After unless it says
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")

ROUTES = (
    "POST /v1/recipes, POST /v1/generate, POST /v1/chat/completions, POST /v1/completions, "
    "GET /v1/models[/{id}], "
    "PUT|GET|DELETE /v1/adapters/{name}, GET /healthz, GET /metrics"
)
STORE_DETAIL = "the server could not use its store; try again, or ask the operator (the server's log has the details)"


@dataclass(frozen=True)
class ApiError:
    """An error as HTTP says it: made only by `to_http`, from a kind of error."""

    status: int
    error: str
    detail: str
    headers: dict[str, str] | None = field(default=None)


def status_of(err: BaseException) -> int | None:
    return next((status for kind, status in STATUS if isinstance(err, kind)), None)


def to_http(err: BaseException) -> ApiError:
    """The one mapping: a kind of error -> status (STATUS), its code and detail, Retry-After for the
    retryable. A store failure's details (URIs, endpoints, buckets) go to the log only. Anything
    else is a bug of ours: 500, logged with its traceback."""
    status, headers = status_of(err), None
    if status is None:
        log.error("unexpected error", exc_info=err)
        status, code, detail = (
            500,
            "internal_error",
            f"an unexpected {type(err).__name__} (the server's log has the details)",
        )
    elif isinstance(err, StoreError):
        log.error("store error: %s", err)
        code, detail = "store_error", STORE_DETAIL
    else:
        code, detail = err.code, err.detail
    if isinstance(err, Unavailable):
        headers = {"Retry-After": str(getattr(err, "retry_after_s", RETRY_AFTER_S))}
    elif isinstance(err, MethodNotAllowed):  # every method of the path (Starlette names only one route's)
        headers = {"Allow": ", ".join(err.allow)}
    return ApiError(status, code, detail, headers)


def from_replica(err: BaseException) -> BaseException:
    """The kind of error a model replica raised. Ray re-raises a replica's exception as a RayTaskError
    that is also an instance of the original type; its `cause` is the original, whose message (never
    the traceback Ray adds) is the detail. An engine's plain ValueError is a bad request."""
    cause = getattr(err, "cause", None) or err
    if status_of(cause) is not None:
        return cause
    if isinstance(cause, ValueError):
        return BadArgument(str(cause), "bad_request")
    log.error("generation failed: %s: %s", type(cause).__name__, str(cause)[:2000])
    return GenerationFailed(f"{type(cause).__name__}: {str(cause)[:300]} (see the replica's log)")


def _openai_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def body(err: ApiError, path: str = "") -> dict:
    """The error object for a route: OpenAI's shape on the OpenAI routes, ours elsewhere."""
    if path.startswith(OPENAI_ROUTES):
        return {"error": {"message": err.detail, "type": _openai_type(err.status), "code": err.error, "param": None}}
    return {"error": err.error, "detail": err.detail}


def response(err: ApiError, path: str = "") -> JSONResponse:
    return JSONResponse(body(err, path), status_code=err.status, headers=err.headers)


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

    return isinstance(exc, (TaskCancelledError, ClientDisconnect, ClientClosed))


def install(api: FastAPI) -> None:
    """Every error leaves the app as JSON, never as an HTML page or a stack trace."""

    @api.exception_handler(DdftError)
    @api.exception_handler(StoreError)
    async def _kind(request: Request, exc: Exception):
        return response(to_http(exc), request.url.path)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Starlette's own (no such route, another method, a body it could not parse), as kinds
        where = f"no route {request.method} {request.url.path}: the API has {ROUTES}"
        if exc.status_code == 404:
            kind = NotFound(where)
        elif exc.status_code == 405:
            kind = MethodNotAllowed(where, _methods(request))
        else:
            kind = BadArgument(str(exc.detail), "http_error")
        return response(to_http(kind), request.url.path)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return response(to_http(BadArgument(str(exc.errors())[:500], "bad_request")), request.url.path)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if client_went_away(exc):  # a client that disconnects mid-stream is normal, not an error
            log.info("client went away during %s %s", request.method, request.url.path)
            return response(to_http(ClientClosed("the client closed the connection")), request.url.path)
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return response(to_http(exc), request.url.path)
