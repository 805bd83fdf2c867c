"""Settings, parsed once from the environment and passed down. Only ``main()`` reads env."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipelines.errors import ConfigError
from pipelines.secrets import Secret

DEFAULT_WAVESPEED = "https://api.wavespeed.ai"
DEFAULT_AIMLAPI = "https://api.aimlapi.com"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    #: How the provider reaches the receiver (the ingress URL); default http://host:port.
    public_base_url: str | None = None
    database_url: str = "sqlite:///./.wavechain/state.db"
    wavespeed_base_url: str = DEFAULT_WAVESPEED
    wavespeed_api_key: Secret | None = None
    #: Accepted webhook secrets (rotation); empty → fetched from the provider at start.
    webhook_secrets: tuple[Secret, ...] = ()
    aimlapi_base_url: str = DEFAULT_AIMLAPI
    aimlapi_key: Secret | None = None
    webhook_tolerance_s: int = 300
    max_webhook_bytes: int = 1024 * 1024
    workers: int = 8
    job_lease_s: float = 120.0
    poll_interval_s: float = 0.5

    @property
    def base_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Parse and check every variable; a bad value raises ConfigError naming it."""
        values: dict[str, object] = {}
        for var, attr, parse in _VARIABLES:
            if env.get(var, "").strip():
                values[attr] = parse(env, var)
        url = values.get("database_url")
        if url is not None and not str(url).startswith("sqlite:///"):
            raise ConfigError("DATABASE_URL must be sqlite:///PATH in this build")
        return cls(**values)  # type: ignore[arg-type]


def _secret(env: Mapping[str, str], name: str) -> Secret:
    return Secret(env[name].strip())


def _secrets(env: Mapping[str, str], name: str) -> tuple[Secret, ...]:
    parts = [p.strip() for p in env[name].split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{name}: no secret in the list")
    return tuple(Secret(p) for p in parts)


def _str(env: Mapping[str, str], name: str) -> str:
    return env[name].strip()


def _ranged(lo: int, hi: int) -> Callable[[Mapping[str, str], str], int]:
    return lambda env, name: _int(env, name, lo, hi)


def _int(env: Mapping[str, str], name: str, lo: int, hi: int) -> int:
    try:
        value = int(env[name])
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {env[name]!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in range {lo}..{hi}, got {value}")
    return value


def _url(env: Mapping[str, str], name: str) -> str:
    value = env[name].strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an absolute http(s) URL")
    return value


_VARIABLES: tuple[tuple[str, str, Callable[[Mapping[str, str], str], Any]], ...] = (
    ("WAVECHAIN_HOST", "host", _str),
    ("WAVECHAIN_PORT", "port", _ranged(0, 65535)),
    ("PUBLIC_BASE_URL", "public_base_url", _url),
    ("DATABASE_URL", "database_url", _str),
    ("WAVESPEED_BASE_URL", "wavespeed_base_url", _url),
    ("WAVESPEED_API_KEY", "wavespeed_api_key", _secret),
    ("WAVESPEED_WEBHOOK_SECRETS", "webhook_secrets", _secrets),
    ("AIMLAPI_BASE_URL", "aimlapi_base_url", _url),
    ("AIMLAPI_KEY", "aimlapi_key", _secret),
    ("WEBHOOK_TOLERANCE_S", "webhook_tolerance_s", _ranged(1, 3600)),
    ("MAX_WEBHOOK_BYTES", "max_webhook_bytes", _ranged(1024, 64 * 1024 * 1024)),
    ("WAVECHAIN_WORKERS", "workers", _ranged(1, 256)),
)
