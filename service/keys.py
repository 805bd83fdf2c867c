"""Typed application keys: every piece of app state, in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from anyio import CapacityLimiter

from pipelines.engine import Engine
from pipelines.events import OutboxRelay
from pipelines.health import Loops
from pipelines.prices import PriceTable
from pipelines.providers import AimlClient, WaveSpeedClient
from pipelines.secrets import Secret
from pipelines.store import Store
from pipelines.sweeper import Sweeper
from service.aws import AwsClients
from service.live import Changes
from service.settings import Settings


@dataclass(slots=True)
class Health:
    """Readiness: true once the workers run, false from the moment draining starts."""

    ready: bool = False
    #: When shutdown must be over (a monotonic time), once draining has started.
    deadline: float | None = None


@dataclass(slots=True)
class WebhookSecrets:
    """The secrets webhook signatures are checked against (several during a rotation).

    Empty when WaveSpeed is off and none are configured: every callback is refused.
    """

    current: tuple[Secret, ...] = ()


SETTINGS = web.AppKey("settings", Settings)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
HEALTH = web.AppKey("health", Health)
LOOPS = web.AppKey("loops", Loops)
#: Wakes the dashboard's live views when something may have changed.
CHANGES = web.AppKey("changes", Changes)
WEBHOOK_SECRETS = web.AppKey("webhook_secrets", WebhookSecrets)
HTTP = web.AppKey("http", aiohttp.ClientSession)
#: Downloads of outputs: guarded resolution, no decompression.
MIRROR_HTTP = web.AppKey("mirror_http", aiohttp.ClientSession)
AWS = web.AppKey("aws", AwsClients)
AWS_LIMITER = web.AppKey("aws_limiter", CapacityLimiter)
STORE = web.AppKey("store", Store)
WAVESPEED = web.AppKey("wavespeed", WaveSpeedClient)
AIML = web.AppKey("aiml", AimlClient)
ENGINE = web.AppKey("engine", Engine)
RELAY = web.AppKey("relay", OutboxRelay)
SWEEPER = web.AppKey("sweeper", Sweeper)
PRICES = web.AppKey("prices", PriceTable)
#: Fields a handler adds to its request's one access line (what it did, for whom).
ACCESS_FIELDS: web.RequestKey[dict[str, Any]] = web.RequestKey("access_fields")
