"""Operations: the try-a-recipe page and its chart, health for probes, Prometheus metrics."""

import asyncio
import dataclasses
import logging
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from serve import answers, prometheus
from serve import openapi_docs as docs
from serve.api import route
from serve.errors import Overloaded

log = logging.getLogger("ddft.serve")
WEB_PAGE = Path(__file__).resolve().parents[1] / "web" / "index.html"


class OperationRoutes:
    @route("get", "/", include_in_schema=False)
    async def page(self):
        """The try-a-recipe page (serve/web/index.html): a static page that calls this API."""
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @route("get", "/eval/latest.png", include_in_schema=False)
    async def eval_chart(self):
        """The page's picture: the newest chart `ddft eval` saved (eval/<time>.png); 404 no_eval_chart
        before the first one."""
        from ddft.eval import chart

        _, png = await asyncio.to_thread(chart.latest, self.store)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @route("get", "/healthz", response_model=answers.Health, responses=docs.errors())
    async def healthz(self, request: Request):
        """For probes: the status only. With the admin key, also a replica's details (its loaded
        adapters, counters), which name tenants' adapters."""
        try:
            info = await self.replicas.info(10)
        except Exception as err:
            log.warning("health: no model replica answered: %s: %s", type(err).__name__, err)
            raise Overloaded("no model replica answered; retry shortly", 5, "unhealthy") from None
        return answers.Health(status="ok", **(dataclasses.asdict(info) if self.auth.is_admin(request) else {}))

    @route(
        "get",
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format", "content": {"text/plain": {}}}},
    )
    async def prometheus(self):
        """Prometheus metrics: requests, latency, tokens, engine figures, adapter cache counters."""
        try:  # a replica's gauges now, not as of its last answer (best effort: a scrape never waits long)
            await self.replicas.info(2)
        except Exception as err:
            log.debug("metrics: no fresh replica stats: %s: %s", type(err).__name__, err)
        return Response(prometheus.get().render(), media_type=prometheus.CONTENT_TYPE)
