"""The HTTP app every gateway route hangs on (FastAPI, served by the Gateway deployment): its errors
as JSON (serve/errors.py), requests and latency on /metrics, and the OpenAPI document stating the
serving config's limits."""

import inspect
import time

from fastapi import Depends, FastAPI, Request

from ddft import config as ddft_config
from serve import errors, openapi_docs, prometheus

api = FastAPI(
    title="ddft",
    description="Directed Domain Fine-Tuning of Video-LLaVA: one adapter per modality, "
    "tenant adapters, one shared base",
)
errors.install(api)


def openapi(settings: ddft_config.ServeSettings | None = None) -> dict:
    """FastAPI's document, finished to state the limits of `settings` (the defaults for
    docs/openapi.json; a gateway's own config once it starts); cached like FastAPI's."""
    if api.openapi_schema is None or settings is not None:
        s = settings or ddft_config.ServeSettings()
        api.openapi_schema = None  # FastAPI.openapi builds afresh only then
        api.openapi_schema = openapi_docs.finish(
            FastAPI.openapi(api), {"max_new_tokens": s.max_new_tokens, "max_n": s.max_n}
        )
    return api.openapi_schema


api.openapi = openapi


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


def _servable():
    from ray import serve

    return serve.get_replica_context().servable_object


def _served(method):
    """A gateway method as a route: `self` is the replica's Gateway (a FastAPI dependency), the rest
    keyword-only. Serve's ingress does the same to the class's routes, in the process that defines
    the class; the route modules are imported afresh in each replica, so their methods say it
    themselves (without it, a replica reads `self` as a query parameter)."""
    sig = inspect.signature(method)
    first, *rest = sig.parameters.values()
    params = [first.replace(default=Depends(_servable))]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest]
    method.__signature__ = sig.replace(parameters=params)
    return method


def route(method: str, path: str, **options):
    """Register a Gateway method (in serve/routes/) as the route `method path` of the app."""
    register = getattr(api, method)(path, **options)
    return lambda func: register(_served(func))
