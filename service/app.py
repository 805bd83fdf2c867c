"""The app factory. ``serve``, ``demo`` and the tests all build the app here."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest

from pipelines.engine import Engine, EngineConfig
from pipelines.errors import ConfigError, ProviderError, SpecError
from pipelines.events import OutboxRelay, SnsPublisher
from pipelines.mirror import MirrorConfig, S3Mirror
from pipelines.providers import AimlClient, WaveSpeedClient
from pipelines.secrets import Secret
from pipelines.state import InvalidTransitionError
from pipelines.store import Store
from pipelines.sweeper import Sweeper, SweeperConfig
from service import keys
from service import logging as service_logging
from service.aws import make_clients
from service.routes import setup_routes
from service.settings import DEFAULT_AIMLAPI, DEFAULT_WAVESPEED, Settings

log = structlog.get_logger("wavechain.app")
_access = structlog.get_logger("wavechain.access")
# Request ids: unique per process start and cheap (no urandom syscall per request).
_PREFIX = f"{uuid.uuid4().hex[:8]}-"
_IDS = itertools.count(1)
_REQUEST_ID = web.RequestKey("request_id", str)
_ROUTE = web.RequestKey("route", str)
_NONE: dict[str, Any] = {}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def context_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id for every log line; map domain errors to HTTP answers."""
    request_id = request.headers.get("X-Request-Id", "")[:64] or f"{_PREFIX}{next(_IDS):x}"
    # The route template, never the path: webhook paths carry a secret token.
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    service_logging.request_context.set((request_id, route))
    request[_REQUEST_ID], request[_ROUTE] = request_id, route  # for the access line
    try:
        response = await handler(request)
    except SpecError as exc:
        response = web.json_response({"error": str(exc)}, status=400)
    except InvalidTransitionError as exc:
        response = web.json_response({"error": str(exc)}, status=409)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("request.failed")
        response = web.json_response(
            {"error": "internal error", "request_id": request_id}, status=500
        )
    response.headers["X-Request-Id"] = request_id
    return response


class AccessLog(AbstractAccessLogger):
    """One structured line per request: the route template (never the path: webhook paths
    carry a secret token), status, bytes and duration, with the request id bound by
    ``context_and_errors``, and whatever the handler added under ``keys.ACCESS_FIELDS``
    (a webhook delivery's effect, task and run). Cheaper than aiohttp's formatted line
    through stdlib logging, and one line per request instead of one per step."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        # Built when the server starts, after logging is configured: one lookup saved
        # per request over the module's lazy proxy.
        self._log = _access.bind()

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        # The whole line in one dict, handed over to the writer, which completes it.
        fields = {
            "event": "http.request",
            "method": request.method,
            # A request that never reached the middleware (unparseable) has neither.
            "route": request.get(_ROUTE, "unmatched"),
            "request_id": request.get(_REQUEST_ID),
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
            **request.get(keys.ACCESS_FIELDS, _NONE),
        }
        write = service_logging.access_writer  # None until logging is configured
        if write is not None:
            write(fields)
        else:
            self._log.info(**fields)

    @property
    def enabled(self) -> bool:
        return bool(self._log.is_enabled_for(logging.INFO))


def require_token(token: Secret | None) -> Middleware:
    """The REST API needs ``Authorization: Bearer <token>`` when one is configured."""
    expected = f"Bearer {token.reveal()}".encode() if token else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "missing or wrong API token"}, status=401)
        return await handler(request)

    return middleware


def _provider_key(key: Secret | None, base_url: str, default: str, name: str) -> Secret:
    if key is not None:
        return key
    if base_url != default:
        return Secret("emulator")  # the emulator accepts any key
    raise ConfigError(
        f"{name} is not set: set it to use the real API, or point the base URL at the "
        "emulator (wavechain emulator)"
    )


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> web.Application:
    # The token check is a layer only when a token is configured: no cost otherwise.
    middlewares: list[Middleware] = [context_and_errors]
    if settings.api_token is not None:
        middlewares.append(require_token(settings.api_token))
    app = web.Application(middlewares=middlewares)
    app[keys.SETTINGS] = settings
    app[keys.CLOCK] = clock
    app[keys.HEALTH] = keys.Health()
    wavespeed_key = _provider_key(
        settings.wavespeed_api_key, settings.wavespeed_base_url, DEFAULT_WAVESPEED,
        "WAVESPEED_API_KEY",
    )  # fmt: skip
    aiml_key = _provider_key(
        settings.aimlapi_key, settings.aimlapi_base_url, DEFAULT_AIMLAPI, "AIMLAPI_KEY"
    )

    async def http_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=100, limit_per_host=50)
        async with aiohttp.ClientSession(connector=connector) as session:
            app[keys.HTTP] = session
            yield

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        session = app[keys.HTTP]
        wavespeed = WaveSpeedClient(
            session, base_url=settings.wavespeed_base_url, api_key=wavespeed_key
        )
        aiml = AimlClient(session, base_url=settings.aimlapi_base_url, api_key=aiml_key)
        engine: Engine | None = None
        store = Store(
            settings.database_url,
            on_jobs=lambda: engine.notify() if engine else None,
            on_events=lambda: relay.notify() if (relay := app.get(keys.RELAY)) else None,
            callback_timeout_s=settings.callback_timeout_s,
            hard_timeout_factor=settings.hard_timeout_factor,
        )
        await store.start()
        try:
            config = EngineConfig(
                public_base_url=settings.base_url,
                workers=settings.workers,
                job_lease_s=settings.job_lease_s,
                poll_interval_s=settings.poll_interval_s,
                downstream_urls="provider"
                if settings.downstream_urls == "provider"
                else "mirrored",
                presign_ttl_s=settings.presign_ttl_s,
                submit_backoff_s=settings.submit_backoff_s,
            )
            mirror = None
            if settings.s3_bucket:
                mirror_config = MirrorConfig(
                    bucket=settings.s3_bucket,
                    prefix=settings.s3_prefix,
                    allowed_hosts=settings.allowed_hosts(),
                    max_bytes=settings.mirror_max_bytes,
                )
                mirror = S3Mirror(
                    app[keys.AWS].s3, session, mirror_config, limiter=app[keys.AWS_LIMITER]
                )
            engine = Engine(
                store, config, wavespeed=wavespeed, aiml=aiml, mirror=mirror, clock=clock
            )
            sweeper_config = SweeperConfig(
                interval_s=settings.reconcile_interval_s,
                extend_s=max(1.0, settings.callback_timeout_s / 4),
                claim_s=max(5.0, settings.reconcile_interval_s * 2),
            )
            app[keys.SWEEPER] = Sweeper(store, wavespeed, sweeper_config, clock=clock)
            app[keys.ENGINE] = engine
            app[keys.HEALTH].webhook_secrets = settings.webhook_secrets or (
                await _fetch_secret(wavespeed),
            )
            yield
        finally:
            await store.close()

    async def aws_ctx(app: web.Application) -> AsyncIterator[None]:
        # Built in a thread: boto3 reads config files and may look up credentials.
        app[keys.AWS] = await anyio.to_thread.run_sync(make_clients, settings)
        app[keys.AWS_LIMITER] = anyio.CapacityLimiter(settings.aws_concurrency)
        yield

    async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
        if not settings.sns_topic_arn:
            yield
            return
        publisher = SnsPublisher(
            app[keys.AWS].sns, settings.sns_topic_arn, limiter=app[keys.AWS_LIMITER]
        )
        relay = OutboxRelay(app[keys.ENGINE].store, publisher, clock=clock)
        app[keys.RELAY] = relay
        task = asyncio.create_task(relay.run(), name="outbox-relay")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def workers_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(app[keys.ENGINE].run_workers(), name="workers")
        app[keys.HEALTH].ready = True
        log.info("service.ready", base_url=settings.base_url, workers=settings.workers)
        yield
        app[keys.HEALTH].ready = False
        # Graceful: no new jobs; running ones get the grace period, then are cancelled.
        # A cancelled job keeps its lease row and is taken again after a restart.
        finished = await app[keys.ENGINE].stop(settings.shutdown_grace_s)
        log.info("workers.stopped", drained=finished)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(app[keys.SWEEPER].run(), name="sweeper")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def not_ready(app: web.Application) -> None:
        app[keys.HEALTH].ready = False

    app.cleanup_ctx.extend([http_ctx, aws_ctx, engine_ctx, relay_ctx, sweeper_ctx, workers_ctx])
    app.on_shutdown.append(not_ready)
    setup_routes(app)
    return app


async def _fetch_secret(client: WaveSpeedClient) -> Secret:
    try:
        return await client.webhook_secret()
    except (ProviderError, aiohttp.ClientError, TimeoutError) as exc:
        raise ConfigError(
            "WAVESPEED_WEBHOOK_SECRETS is not set and the secret could not be fetched from "
            f"the provider: {exc}"
        ) from exc
