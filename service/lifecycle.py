"""One cleanup context per resource, in the order ``create_app`` starts them.

Each context builds its resource before ``yield`` and releases it after; aiohttp runs
the teardown of exactly those whose startup finished, in reverse order. Background
loops start a task before ``yield`` and cancel it after.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
import structlog
from aiohttp import web

from pipelines.engine import Engine, EngineConfig
from pipelines.errors import ConfigError, ProviderError
from pipelines.events import OutboxRelay, SnsPublisher
from pipelines.health import NO_REPORTS, Reporter
from pipelines.loops import run_every
from pipelines.mirror import MirrorConfig, S3Mirror, mirror_session
from pipelines.prices import PriceTable
from pipelines.providers import AimlClient, WaveSpeedClient
from pipelines.secrets import Secret
from pipelines.store import Store, StoreConfig, open_store, parse_database_url
from pipelines.sweeper import Sweeper, SweeperConfig
from pipelines.transitions import Deadlines
from service import keys
from service.aws import AwsClients, make_clients
from service.settings import Settings

log = structlog.get_logger("wavechain.app")


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    """The provider clients' session, and the output downloads' own (guarded) one."""
    connector = aiohttp.TCPConnector(limit=100, limit_per_host=50)
    allow_loopback = app[keys.SETTINGS].local_endpoints
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        mirror_session(allow_loopback=allow_loopback) as downloads,
    ):
        app[keys.HTTP] = session
        app[keys.MIRROR_HTTP] = downloads
        yield


async def aws_ctx(app: web.Application) -> AsyncIterator[None]:
    # Built in a thread: boto3 reads config files and may look up credentials.
    settings = app[keys.SETTINGS]
    app[keys.AWS] = await anyio.to_thread.run_sync(make_clients, settings)
    app[keys.AWS_LIMITER] = anyio.CapacityLimiter(settings.aws_concurrency)
    yield


async def providers_ctx(app: web.Application) -> AsyncIterator[None]:
    """The provider clients, and a line saying which providers are live, emulated or off."""
    access = app[keys.SETTINGS].provider_access()
    if all(a.mode == "off" for a in access.values()):
        raise ConfigError(
            "no provider is configured: set WAVESPEED_API_KEY (and AIMLAPI_KEY for Hunyuan "
            "Image 3), or point WAVESPEED_BASE_URL and AIMLAPI_BASE_URL at a local emulator "
            "(wavechain emulator)"
        )
    app[keys.WAVESPEED] = WaveSpeedClient(app[keys.HTTP], access["wavespeed"])
    app[keys.AIML] = AimlClient(app[keys.HTTP], access["aimlapi"])
    log.info(
        "service.providers",
        **{name: a.mode for name, a in access.items()},
        **{f"{name}_base_url": a.base_url for name, a in access.items()},
    )
    yield


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    config = StoreConfig(
        deadlines=Deadlines(settings.callback_timeout_s, settings.hard_timeout_factor),
        # The provider client's own timeout (30 s), and a margin.
        submit_timeout_s=60.0,
        pool_size=settings.database_pool_size,
        governor=settings.governor(),
    )
    for provider, limits in config.governor.limits.items():
        log.info("governor.limits", provider=provider, **dataclasses.asdict(limits))
    store = open_store(settings.database_url, config)
    await store.start()
    log.info("store.opened", database=parse_database_url(settings.database_url).redacted())
    app[keys.STORE] = store
    store.listen(jobs=app[keys.CHANGES].notify, events=app[keys.CHANGES].notify)
    try:
        yield
    finally:
        await store.close()


def build_engine(
    settings: Settings,
    store: Store,
    *,
    wavespeed: WaveSpeedClient,
    aiml: AimlClient,
    http: aiohttp.ClientSession,
    aws: AwsClients,
    aws_limiter: anyio.CapacityLimiter,
    clock: Callable[[], float],
    prices: PriceTable | None = None,
    on_iteration: Reporter = NO_REPORTS,
) -> Engine:
    """The engine as configured: its workers' settings and, with a bucket, the S3 mirror."""
    config = EngineConfig(
        public_base_url=settings.base_url,
        workers=settings.workers,
        job_lease_s=settings.job_lease_s,
        poll_interval_s=settings.poll_interval_s,
        downstream_urls="provider" if settings.downstream_urls == "provider" else "mirrored",
        presign_ttl_s=settings.presign_ttl_s,
        submit_backoff_s=settings.submit_backoff_s,
        daily_budget_usd=settings.daily_budget_usd,
        budget_exceeded="wait" if settings.budget_exceeded == "wait" else "fail",
        budget_wait_s=settings.budget_wait_s,
        aiml_usd_per_credit=settings.aimlapi_usd_per_credit,
        check_balance=settings.check_balance,
        balance_cache_s=settings.balance_cache_s,
        result_cache=settings.result_cache,
        governor=settings.governor(),
    )
    mirror = None
    if settings.s3_bucket:
        mirror_config = MirrorConfig(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            allowed_hosts=settings.allowed_hosts(),
            max_bytes=settings.mirror_max_bytes,
            allow_loopback=settings.local_endpoints,
        )
        mirror = S3Mirror(aws.s3, http, mirror_config, limiter=aws_limiter)
    return Engine(
        store,
        config,
        wavespeed=wavespeed,
        aiml=aiml,
        mirror=mirror,
        clock=clock,
        prices=prices,
        on_iteration=on_iteration,
    )


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = build_engine(
        app[keys.SETTINGS],
        app[keys.STORE],
        wavespeed=app[keys.WAVESPEED],
        aiml=app[keys.AIML],
        http=app[keys.MIRROR_HTTP],
        aws=app[keys.AWS],
        aws_limiter=app[keys.AWS_LIMITER],
        clock=app[keys.CLOCK],
        prices=app[keys.PRICES],
        on_iteration=app[keys.LOOPS].register(
            "workers", interval_s=app[keys.SETTINGS].poll_interval_s
        ),
    )
    app[keys.STORE].listen(jobs=engine.notify)
    app[keys.ENGINE] = engine
    yield


async def webhook_secrets_ctx(app: web.Application) -> AsyncIterator[None]:
    """The configured secrets; else, unless WaveSpeed is off, the provider's own, fetched
    again every ``WEBHOOK_SECRET_REFRESH_S`` (a rotation at the provider is picked up)."""
    settings, wavespeed = app[keys.SETTINGS], app[keys.WAVESPEED]
    secrets: tuple[Secret, ...] = settings.webhook_secrets
    fetched = not secrets and wavespeed.access.mode != "off"
    if fetched:
        secrets = (await _fetch_secret(wavespeed),)
    if not secrets:
        log.warning("webhooks.no_secret", reason="WaveSpeed is off: every callback is refused")
    holder = app[keys.WEBHOOK_SECRETS] = keys.WebhookSecrets(secrets)
    if not fetched:
        yield
        return

    async def refresh() -> None:
        secret = await _fetch_secret(wavespeed)
        if secret not in holder.current:
            # The old one stays accepted beside the new: deliveries signed before the
            # rotation may still be retried.
            holder.current = (secret, *holder.current[:1])
            log.info("webhooks.secret_rotated")

    interval = settings.webhook_secret_refresh_s
    report = app[keys.LOOPS].register("webhook-secret", interval_s=interval)
    async with _running(
        "webhook-secret",
        run_every("webhooks.secret_refresh", interval, refresh, report=report),
        app,
    ):
        yield


async def _fetch_secret(client: WaveSpeedClient) -> Secret:
    try:
        return await client.webhook_secret()
    except (ProviderError, aiohttp.ClientError, TimeoutError) as exc:
        raise ConfigError(
            "WAVESPEED_WEBHOOK_SECRETS is not set and the secret could not be fetched from "
            f"the provider: {exc}"
        ) from exc


@contextlib.asynccontextmanager
async def _running(
    name: str, loop: Coroutine[Any, Any, None], app: web.Application
) -> AsyncIterator[None]:
    """A background loop, started on entry, cancelled and awaited on exit. A loop that
    ends by itself (it should not) turns the health checks red."""
    task = asyncio.create_task(loop, name=name)

    def ended(done: asyncio.Task[None]) -> None:
        if not done.cancelled():
            error = done.exception()
            log.error("loop.ended", loop=name, error=repr(error))
            app[keys.LOOPS].ended(name, error)

    task.add_done_callback(ended)
    try:
        yield
    finally:
        task.remove_done_callback(ended)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    if not settings.sns_topic_arn:  # events stay in the outbox until a topic is configured
        yield
        return
    publisher = SnsPublisher(
        app[keys.AWS].sns, settings.sns_topic_arn, limiter=app[keys.AWS_LIMITER]
    )
    report = app[keys.LOOPS].register("relay", interval_s=1.0)
    relay = OutboxRelay(
        app[keys.STORE],
        publisher,
        clock=app[keys.CLOCK],
        on_iteration=report,
        max_tries=settings.event_max_tries,
        retry_base_s=settings.event_retry_base_s,
    )
    app[keys.STORE].listen(events=relay.notify)
    app[keys.RELAY] = relay
    async with _running("relay", relay.run(), app):
        yield


async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    config = SweeperConfig(
        interval_s=settings.reconcile_interval_s,
        extend_s=max(1.0, settings.callback_timeout_s / 4),
        claim_s=max(5.0, settings.reconcile_interval_s * 2),
        lease_s=max(5.0, settings.reconcile_interval_s * 3),
    )
    report = app[keys.LOOPS].register("sweeper", interval_s=config.interval_s)
    sweeper = Sweeper(
        app[keys.STORE], app[keys.WAVESPEED], config, clock=app[keys.CLOCK], on_iteration=report
    )
    app[keys.SWEEPER] = sweeper
    async with _running("sweeper", sweeper.run(), app):
        yield


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """Deliveries, sent events and ended runs' attempts older than RETENTION_S go."""
    settings, store, clock = app[keys.SETTINGS], app[keys.STORE], app[keys.CLOCK]

    async def prune() -> None:
        pruned = await store.prune(before=clock() - settings.retention_s)
        if any(pruned):
            log.info("retention.pruned", **pruned._asdict())

    interval = settings.retention_interval_s
    report = app[keys.LOOPS].register("retention", interval_s=interval)
    async with _running("retention", run_every("retention", interval, prune, report=report), app):
        yield


async def workers_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, engine, health = app[keys.SETTINGS], app[keys.ENGINE], app[keys.HEALTH]
    task = asyncio.create_task(engine.run_workers(), name="workers")

    def ended(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and not engine.stopping:
            app[keys.LOOPS].ended("workers", done.exception())

    task.add_done_callback(ended)
    health.ready = True
    log.info("service.ready", base_url=settings.base_url, workers=settings.workers)
    yield
    health.ready = False
    # Graceful: no new jobs; running ones get what is left of the grace period (the
    # requests in flight had their share first), then are cancelled. A cancelled job
    # keeps its lease row and is taken again by another process or after a restart.
    grace = settings.shutdown_grace_s
    if health.deadline is not None:
        grace = max(0.0, health.deadline - time.monotonic())
    finished = await engine.stop(grace)
    log.info("workers.stopped", drained=finished)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def not_ready(app: web.Application) -> None:
    """On shutdown: readiness turns false at once."""
    app[keys.HEALTH].ready = False


async def end_streams(app: web.Application) -> None:
    """On shutdown: the live streams (server-sent events) end, rather than holding the
    shutdown for its grace period; browsers reconnect to another replica."""
    app[keys.CHANGES].close()
