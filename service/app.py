"""The app factory. ``serve``, ``demo`` and the tests all build the app here."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from pipelines.health import Loops
from pipelines.prices import load_prices
from service import keys, lifecycle
from service.live import Changes
from service.middlewares import context_and_errors, require_token
from service.routes import setup_routes
from service.settings import Settings


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> web.Application:
    middlewares: list[Middleware] = [context_and_errors]
    if settings.api_token is not None:  # a layer only when a token is configured
        middlewares.append(require_token(settings.api_token))
    app = web.Application(middlewares=middlewares)
    app[keys.SETTINGS] = settings
    app[keys.CLOCK] = clock
    app[keys.HEALTH] = keys.Health()
    app[keys.LOOPS] = Loops(dead_after_s=settings.liveness_failure_s)
    app[keys.CHANGES] = Changes()
    app[keys.PRICES] = load_prices(settings.prices_file)  # ConfigError before serving
    app.cleanup_ctx.extend(
        [
            lifecycle.http_ctx,
            lifecycle.aws_ctx,
            lifecycle.providers_ctx,
            lifecycle.store_ctx,
            lifecycle.engine_ctx,
            lifecycle.webhook_secrets_ctx,
            lifecycle.relay_ctx,
            lifecycle.sweeper_ctx,
            lifecycle.retention_ctx,
            lifecycle.workers_ctx,
        ]
    )
    app.on_shutdown.extend([lifecycle.not_ready, lifecycle.end_streams])
    setup_routes(app)
    return app
