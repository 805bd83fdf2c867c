"""`wavechain serve`: the listener, its limits, and a shutdown that fits the grace period.

On SIGTERM (or SIGINT): readiness turns false and the workers stop claiming new jobs at
once; the listener stays open ``DRAIN_DELAY_S`` (the ingress stops sending); then
in-flight requests and jobs share what is left of ``SHUTDOWN_GRACE_S``, so the whole
shutdown takes at most DRAIN_DELAY_S + SHUTDOWN_GRACE_S (22 s by default, inside the
pod's 30 s). A job still running then is cancelled; its lease lapses and another
process takes it.

Slow clients: a request body must arrive within ``BODY_READ_TIMEOUT_S`` (408 otherwise);
idle keep-alive connections close after ``KEEPALIVE_TIMEOUT_S``; beyond
``MAX_CONNECTIONS`` open connections a new one is closed at once. Header read timeouts
belong to the ingress (nginx: ``client_header_timeout``; see infra/README.md).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from typing import Any

import structlog
from aiohttp import web

from service import keys
from service.app import create_app
from service.middlewares import AccessLog
from service.settings import Settings

log = structlog.get_logger("wavechain.cli")


def loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # not on every platform; the standard loop works, only slower
        return None
    return uvloop.new_event_loop


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class CappedSite(web.TCPSite):
    """A TCP site that closes new connections beyond ``max_connections`` at once."""

    def __init__(self, runner: web.BaseRunner, *args: Any, max_connections: int, **kw: Any):
        super().__init__(runner, *args, **kw)
        self._max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None  # noqa: S101 - the runner is set up before its sites

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= self._max_connections:
                log.warning("http.connection_refused", open=len(server.connections))
                return _Refused()
            protocol: asyncio.Protocol = server()
            return protocol

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


async def serve_until_signal(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then shut down within the grace period (see above)."""
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_grace_s,
        access_log_class=AccessLog,
        keepalive_timeout=settings.keepalive_timeout_s,
    )
    await runner.setup()
    # What startup built lives as long as the process: frozen, full collections under
    # load walk only what requests allocate; and a higher first threshold collects the
    # few cycles each request leaves less often (docs/benchmarks.md has the figures).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    site = CappedSite(
        runner,
        settings.host,
        settings.port,
        max_connections=settings.max_connections,
        reuse_port=reuse_port or None,
    )
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    health = app[keys.HEALTH]
    health.ready = False
    health.deadline = time.monotonic() + settings.drain_delay_s + settings.shutdown_grace_s
    app[keys.ENGINE].drain()
    log.info("service.draining", delay_s=settings.drain_delay_s)
    await asyncio.sleep(settings.drain_delay_s)
    await runner.cleanup()
    log.info("service.stopped")
