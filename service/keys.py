"""Typed application keys: every piece of app state, in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from anyio import CapacityLimiter

from pipelines.engine import Engine
from pipelines.events import OutboxRelay
from pipelines.secrets import Secret
from pipelines.sweeper import Sweeper
from service.aws import AwsClients
from service.settings import Settings


@dataclass(slots=True)
class Health:
    ready: bool = False
    webhook_secrets: tuple[Secret, ...] = field(default=())


SETTINGS = web.AppKey("settings", Settings)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
HTTP = web.AppKey("http", aiohttp.ClientSession)
ENGINE = web.AppKey("engine", Engine)
HEALTH = web.AppKey("health", Health)
AWS = web.AppKey("aws", AwsClients)
AWS_LIMITER = web.AppKey("aws_limiter", CapacityLimiter)
RELAY = web.AppKey("relay", OutboxRelay)
SWEEPER = web.AppKey("sweeper", Sweeper)
#: Fields a handler adds to its request's one access line (what it did, for whom).
ACCESS_FIELDS: web.RequestKey[dict[str, Any]] = web.RequestKey("access_fields")
