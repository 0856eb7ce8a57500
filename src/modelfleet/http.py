"""The controller's status API: ``/v1/models``, ``/v1/workers``, ``/healthz``, ``/metrics``.

It shares the controller's event loop (aiohttp), reads only in-memory state, and never touches
the broker, so a scrape costs microseconds and cannot slow the control plane.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from modelfleet.controller import Controller

__all__ = ["StatusServer", "build_app"]


def build_app(controller: Controller) -> web.Application:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"models": controller.models_status()})

    async def workers(_: web.Request) -> web.Response:
        return web.json_response({"workers": controller.workers_status()})

    async def healthz(_: web.Request) -> web.Response:
        # Unhealthy (503) also while the heartbeat consumer is gone or the controller's own
        # probe has not come back: such a controller would evict nobody and route nothing new.
        body = controller.health()
        body.update(instance=controller.instance, namespace=controller.names.ns)
        return web.json_response(body, status=200 if body["healthy"] else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=controller.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/workers", workers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


class StatusServer:
    """Serves :func:`build_app` on ``host:port`` (port 0 picks a free one; see ``.port``)."""

    def __init__(self, controller: Controller, host: str, port: int) -> None:
        self._runner = web.AppRunner(build_app(controller), access_log=None)
        self.host = host
        self.port = port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0 and self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
