"""The Controller Factory: one function from settings to a running controller with its API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from modelfleet.config import Settings
from modelfleet.controller import Controller
from modelfleet.errors import ConfigError
from modelfleet.http import StatusServer

__all__ = ["ControllerService", "build_controller"]

log = logging.getLogger(__name__)


class ControllerService:
    """A :class:`Controller` plus its status/metrics HTTP server, started and stopped together."""

    def __init__(self, controller: Controller, server: StatusServer) -> None:
        self.controller = controller
        self.server = server
        self._stop = asyncio.Event()

    async def start(self) -> None:
        # The port first: a port in use fails in milliseconds, before any broker work.
        try:
            await self.server.start()
        except OSError as exc:
            await self.server.stop()
            raise ConfigError(
                f"http.host/http.port: cannot serve the status API on "
                f"{self.server.host}:{self.server.port} ({exc.strerror or exc}): another "
                "controller there? pick another with --port or http.port"
            ) from None
        try:
            await self.controller.start()
        except BaseException:
            await self.server.stop()
            raise
        log.info("status API on %s (/v1/models /v1/workers /healthz /metrics)", self.server.url)

    async def stop(self) -> None:
        await self.server.stop()
        await self.controller.stop()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT or a controller failure, stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.controller.serve_until(self._stop)
        finally:
            await self.stop()
        self.controller.raise_if_failed()  # a core task died: exit non-zero (cli: 3)


def build_controller(settings: Settings, *, instance: str | None = None) -> ControllerService:
    """Build a controller (connection, topology, registry, metrics) and its HTTP server."""
    controller = Controller(settings, instance=instance)
    server = StatusServer(controller, settings.http.host, settings.http.port)
    return ControllerService(controller, server)
