"""Settings, parsed once from the environment and passed down. Only ``main()`` reads env."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipelines.catalog import Provider
from pipelines.errors import ConfigError
from pipelines.governor import LEVELS, AccountLimits, Governor
from pipelines.providers import ProviderAccess, is_loopback
from pipelines.secrets import Secret
from pipelines.spec import Limits
from pipelines.store import parse_database_url

DEFAULT_WAVESPEED = "https://api.wavespeed.ai"
DEFAULT_AIMLAPI = "https://api.aimlapi.com"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    #: How the provider reaches the receiver (the ingress URL); default http://host:port.
    public_base_url: str | None = None
    database_url: str = "sqlite:///./.wavechain/state.db"
    #: PostgreSQL: pooled connections per process.
    database_pool_size: int = 10
    wavespeed_base_url: str = DEFAULT_WAVESPEED
    wavespeed_api_key: Secret | None = None
    #: Accepted webhook secrets (rotation); empty → fetched from the provider at start.
    webhook_secrets: tuple[Secret, ...] = ()
    aimlapi_base_url: str = DEFAULT_AIMLAPI
    aimlapi_key: Secret | None = None
    webhook_tolerance_s: int = 300
    max_webhook_bytes: int = 1024 * 1024
    workers: int = 8
    #: Renewed by a heartbeat while a job runs; a dead worker's jobs return after this.
    job_lease_s: float = 30.0
    poll_interval_s: float = 0.5
    #: Wait this long for a callback before asking the provider (a stage's timeout wins).
    callback_timeout_s: float = 600.0
    #: A task still running after timeout times this factor times out.
    hard_timeout_factor: float = 4.0
    reconcile_interval_s: float = 5.0
    #: First wait before re-sending a throttled or failed submit (doubles each time).
    submit_backoff_s: float = 1.0
    #: Required as a Bearer token on /v1/* when set (not on webhooks or health).
    api_token: Secret | None = None
    #: On SIGTERM: how long in-flight requests and jobs get to finish.
    shutdown_grace_s: float = 20.0
    #: On SIGTERM: how long /readyz answers 503 before the listener closes.
    drain_delay_s: float = 2.0
    #: A request body must arrive within this (408 otherwise).
    body_read_timeout_s: float = 10.0
    #: Idle keep-alive connections close after this.
    keepalive_timeout_s: float = 15.0
    #: Open connections beyond this are closed at once.
    max_connections: int = 1000
    #: Mirror target; no bucket means outputs are not copied.
    s3_bucket: str | None = None
    s3_prefix: str = ""
    #: A local S3/SNS/SQS endpoint (moto); unset means real AWS.
    aws_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    #: Only used with AWS_ENDPOINT_URL; real AWS uses boto3's own credential chain.
    aws_access_key_id: Secret | None = None
    aws_secret_access_key: Secret | None = None
    sns_topic_arn: str | None = None
    #: Host patterns outputs may be downloaded from; the provider base URLs' hosts are added.
    mirror_allowed_hosts: tuple[str, ...] = ("*.wavespeed.ai", "*.cloudfront.net", "*.aimlapi.com")
    mirror_max_bytes: int = 2 * 1024**3
    downstream_urls: str = "mirrored"
    presign_ttl_s: int = 6 * 3600
    aws_concurrency: int = 8
    #: How big a pipeline may be: stages, and bytes of a REST request (an inline spec).
    max_pipeline_stages: int = 100
    max_spec_bytes: int = 256 * 1024
    #: A loop (workers, sweeper, relay) failing this long turns liveness red.
    liveness_failure_s: float = 120.0
    #: Deliveries, sent events and ended runs' attempts older than this are deleted.
    retention_s: float = 30 * 86400.0
    retention_interval_s: float = 3600.0
    #: Tries of one event SNS refuses before it is parked (a dead letter), and the first
    #: wait between them (doubling).
    event_max_tries: int = 8
    #: The price table (pipelines/prices.py); None: the shipped defaults.
    prices_file: str | None = None
    #: What every run together may spend per UTC day; None: no cap.
    daily_budget_usd: float | None = None
    #: A stage that would cross a cap: its run fails ("fail"), or it waits ("wait") and
    #: is tried again every ``budget_wait_s`` (a new day, a raised cap).
    budget_exceeded: str = "fail"
    budget_wait_s: float = 60.0
    #: USD per AI/ML API credit: converts each call's ``credits_used`` to its cost.
    aimlapi_usd_per_credit: float | None = None
    #: Ask WaveSpeed for the account's balance before a run starts ("on"), and refuse a
    #: run whose estimate is more than it; the answer is kept ``balance_cache_s``.
    check_balance: bool = False
    balance_cache_s: float = 60.0
    #: WaveSpeed account limits (the governor): a level's, or explicit numbers (which win).
    wavespeed_account_level: str | None = None
    wavespeed_tasks_per_min: int | None = None
    wavespeed_max_in_flight: int | None = None
    #: The length of the rate's window (WaveSpeed: a minute); shorter for tests.
    wavespeed_rate_window_s: float = 60.0
    #: Serve every stage with a fixed seed from the result cache unless it says
    #: ``cache: false`` (without it, only stages that say ``cache: true``). Needs S3_BUCKET.
    result_cache: bool = False
    event_retry_base_s: float = 1.0
    #: How often a webhook secret fetched from the provider is fetched again.
    webhook_secret_refresh_s: float = 3600.0

    def governor(self) -> Governor:
        """The providers' account limits: WAVESPEED_ACCOUNT_LEVEL's, then the explicit
        WAVESPEED_TASKS_PER_MIN / WAVESPEED_MAX_IN_FLIGHT over them."""
        per_window, in_flight = LEVELS.get(self.wavespeed_account_level or "", (None, None))
        if self.wavespeed_tasks_per_min is not None:
            per_window = self.wavespeed_tasks_per_min
        if self.wavespeed_max_in_flight is not None:
            in_flight = self.wavespeed_max_in_flight
        if per_window is None and in_flight is None:
            return Governor()
        limits = AccountLimits(per_window, self.wavespeed_rate_window_s, in_flight)
        return Governor({"wavespeed": limits})

    def allowed_hosts(self) -> tuple[str, ...]:
        hosts = {urlsplit(u).hostname for u in (self.wavespeed_base_url, self.aimlapi_base_url)}
        return (*self.mirror_allowed_hosts, *sorted(h for h in hosts if h))

    @property
    def local_endpoints(self) -> bool:
        """A provider or the AWS endpoint is on this machine (an emulator, moto): outputs
        may then come from loopback addresses."""
        urls = (self.wavespeed_base_url, self.aimlapi_base_url, self.aws_endpoint_url or "")
        return any(is_loopback(url) for url in urls if url)

    def provider_access(self) -> dict[Provider, ProviderAccess]:
        """Each provider's access: live (a key), emulator (no key, a local base URL), or off."""
        return {
            "wavespeed": ProviderAccess.resolve(
                "wavespeed",
                key=self.wavespeed_api_key,
                base_url=self.wavespeed_base_url,
                key_variable="WAVESPEED_API_KEY",
            ),
            "aimlapi": ProviderAccess.resolve(
                "aimlapi",
                key=self.aimlapi_key,
                base_url=self.aimlapi_base_url,
                key_variable="AIMLAPI_KEY",
            ),
        }

    @property
    def limits(self) -> Limits:
        return Limits(max_stages=self.max_pipeline_stages, max_spec_bytes=self.max_spec_bytes)

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
        if values.get("downstream_urls", "mirrored") not in ("mirrored", "provider"):
            raise ConfigError("DOWNSTREAM_URLS must be 'mirrored' or 'provider'")
        level = values.get("wavespeed_account_level")
        if level is not None and level not in LEVELS:
            raise ConfigError(
                f"WAVESPEED_ACCOUNT_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}"
            )
        if values.get("budget_exceeded", "fail") not in ("fail", "wait"):
            raise ConfigError("BUDGET_EXCEEDED must be 'fail' or 'wait'")
        if "database_url" in values:
            parse_database_url(str(values["database_url"]))
        return cls(**values)  # type: ignore[arg-type]


def _secret(env: Mapping[str, str], name: str) -> Secret:
    return Secret(env[name].strip())


def _secrets(env: Mapping[str, str], name: str) -> tuple[Secret, ...]:
    parts = [p.strip() for p in env[name].split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{name}: no secret in the list")
    if any(not p.removeprefix("whsec_") for p in parts):
        raise ConfigError(f"{name}: a secret is empty after its whsec_ prefix")
    return tuple(Secret(p) for p in parts)


def _str(env: Mapping[str, str], name: str) -> str:
    return env[name].strip()


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in env[name].split(",") if p.strip())


def _prefix(env: Mapping[str, str], name: str) -> str:
    value = env[name].strip().lstrip("/")
    return value if not value or value.endswith("/") else value + "/"


def _topic(env: Mapping[str, str], name: str) -> str:
    value = env[name].strip()
    if not value.startswith("arn:"):
        raise ConfigError(f"{name} must be an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)")
    return value


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


def _amount(env: Mapping[str, str], name: str) -> float:
    """A non-negative decimal (USD, seconds): ``12.5``."""
    try:
        value = float(env[name])
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {env[name]!r}") from None
    if not 0 <= value <= 1e9 or value != value:
        raise ConfigError(f"{name} must be in range 0..1000000000, got {env[name]!r}")
    return value


def _switch(env: Mapping[str, str], name: str) -> bool:
    value = env[name].strip().lower()
    if value not in ("on", "off", "true", "false", "1", "0"):
        raise ConfigError(f"{name} must be on or off, got {env[name]!r}")
    return value in ("on", "true", "1")


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
    ("DATABASE_POOL_SIZE", "database_pool_size", _ranged(2, 200)),
    ("WAVESPEED_BASE_URL", "wavespeed_base_url", _url),
    ("WAVESPEED_API_KEY", "wavespeed_api_key", _secret),
    ("WAVESPEED_WEBHOOK_SECRETS", "webhook_secrets", _secrets),
    ("AIMLAPI_BASE_URL", "aimlapi_base_url", _url),
    ("AIMLAPI_KEY", "aimlapi_key", _secret),
    ("WEBHOOK_TOLERANCE_S", "webhook_tolerance_s", _ranged(1, 3600)),
    ("MAX_WEBHOOK_BYTES", "max_webhook_bytes", _ranged(1024, 64 * 1024 * 1024)),
    ("WAVECHAIN_WORKERS", "workers", _ranged(1, 256)),
    ("S3_BUCKET", "s3_bucket", _str),
    ("S3_PREFIX", "s3_prefix", _prefix),
    ("AWS_ENDPOINT_URL", "aws_endpoint_url", _url),
    ("AWS_DEFAULT_REGION", "aws_region", _str),
    ("AWS_REGION", "aws_region", _str),
    ("AWS_ACCESS_KEY_ID", "aws_access_key_id", _secret),
    ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", _secret),
    ("SNS_TOPIC_ARN", "sns_topic_arn", _topic),
    ("MIRROR_ALLOWED_HOSTS", "mirror_allowed_hosts", _list),
    ("MIRROR_MAX_BYTES", "mirror_max_bytes", _ranged(1, 2**40)),
    ("DOWNSTREAM_URLS", "downstream_urls", _str),
    ("PRESIGN_TTL_S", "presign_ttl_s", _ranged(60, 7 * 86400)),
    ("AWS_CONCURRENCY", "aws_concurrency", _ranged(1, 64)),
    ("CALLBACK_TIMEOUT_S", "callback_timeout_s", _ranged(1, 7 * 86400)),
    ("RECONCILE_INTERVAL_S", "reconcile_interval_s", _ranged(1, 3600)),
    ("JOB_LEASE_S", "job_lease_s", _ranged(1, 3600)),
    ("WAVECHAIN_API_TOKEN", "api_token", _secret),
    ("SHUTDOWN_GRACE_S", "shutdown_grace_s", _ranged(0, 600)),
    ("DRAIN_DELAY_S", "drain_delay_s", _ranged(0, 120)),
    ("EVENT_MAX_TRIES", "event_max_tries", _ranged(1, 100)),
    ("PRICES_FILE", "prices_file", _str),
    ("DAILY_BUDGET_USD", "daily_budget_usd", _amount),
    ("BUDGET_EXCEEDED", "budget_exceeded", _str),
    ("BUDGET_WAIT_S", "budget_wait_s", _ranged(1, 86400)),
    ("AIMLAPI_USD_PER_CREDIT", "aimlapi_usd_per_credit", _amount),
    ("CHECK_BALANCE", "check_balance", _switch),
    ("BALANCE_CACHE_S", "balance_cache_s", _ranged(0, 86400)),
    ("RESULT_CACHE", "result_cache", _switch),
    ("WAVESPEED_ACCOUNT_LEVEL", "wavespeed_account_level", _str),
    ("WAVESPEED_TASKS_PER_MIN", "wavespeed_tasks_per_min", _ranged(1, 1_000_000)),
    ("WAVESPEED_MAX_IN_FLIGHT", "wavespeed_max_in_flight", _ranged(1, 1_000_000)),
    ("WAVESPEED_RATE_WINDOW_S", "wavespeed_rate_window_s", _ranged(1, 3600)),
    ("BODY_READ_TIMEOUT_S", "body_read_timeout_s", _ranged(1, 600)),
    ("KEEPALIVE_TIMEOUT_S", "keepalive_timeout_s", _ranged(1, 3600)),
    ("MAX_CONNECTIONS", "max_connections", _ranged(10, 1_000_000)),
    ("MAX_PIPELINE_STAGES", "max_pipeline_stages", _ranged(1, 10_000)),
    ("MAX_SPEC_BYTES", "max_spec_bytes", _ranged(1024, 16 * 1024 * 1024)),
    ("LIVENESS_FAILURE_S", "liveness_failure_s", _ranged(5, 86400)),
    ("RETENTION_S", "retention_s", _ranged(3600, 3650 * 86400)),
    ("RETENTION_INTERVAL_S", "retention_interval_s", _ranged(1, 86400)),
    ("WEBHOOK_SECRET_REFRESH_S", "webhook_secret_refresh_s", _ranged(10, 7 * 86400)),
)
