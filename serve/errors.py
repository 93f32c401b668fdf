"""JSON errors for every route: {"error": <short code>, "detail": <what was wrong and the fix>}."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ddft.serve")

ROUTES = ("POST /v1/recipes, POST /v1/generate, POST /v1/chat/completions, GET /v1/models, "
          "PUT|GET|DELETE /v1/adapters/{name}, GET /healthz, GET /metrics")


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        self.status, self.error, self.detail, self.headers = status, error, detail, headers
        super().__init__(f"{status} {error}: {detail}")


def error_response(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def busy(detail: str, retry_after_s: int = 2) -> ApiError:
    """503 with Retry-After: the bounded queue is full or a replica is being replaced."""
    return ApiError(503, "overloaded", detail, headers={"Retry-After": str(retry_after_s)})


def install(api: FastAPI) -> None:
    """Every error leaves the app as JSON, never as an HTML page or a stack trace."""

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = (f"no route {request.method} {request.url.path}: the API has {ROUTES}"
                  if exc.status_code in codes else str(exc.detail))
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), detail)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, "bad_request", str(exc.errors())[:500])

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {str(exc)[:300]} (see the replica's log)")
