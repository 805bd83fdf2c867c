"""Knobs that make the emulator misbehave the way real providers and networks do.

Set at start (CLI flags) or at run time (``PUT /_emulator/faults``). Every value
is checked; an unknown name or an out-of-range value is refused with a message
naming it, and nothing is half-applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

_RATES = (
    "failure_rate",
    "duplicate_rate",
    "drop_rate",
    "submit_error_rate",
    "submit_unclear_rate",
    "delete_error_rate",
)


#: WaveSpeed's account levels (docs: account-levels): tasks per minute, and tasks running
#: at once (above it they queue). Gold's concurrency is not published: unlimited here.
ACCOUNT_LEVELS: dict[str, tuple[int, int | None]] = {
    "bronze": (2, 2),
    "silver": (500, 300),
    "gold": (3000, None),
    "ultra": (5000, 10_000),
}


class FaultError(ValueError):
    """A fault setting is unknown or out of range."""


@dataclass(frozen=True, slots=True)
class Faults:
    #: Seconds from submit to a terminal status (a quarter of it spent in ``created``).
    latency_s: float = 0.2
    #: Share of tasks that end ``failed`` with ``failure_error``.
    failure_rate: float = 0.0
    failure_error: str = "5000: internal error while running the model"
    #: Share of webhooks sent more than once, and how many extra copies.
    duplicate_rate: float = 0.0
    duplicate_count: int = 1
    #: Extra copies reuse the webhook-id (a retry) unless this is set (a re-send).
    duplicate_new_id: bool = False
    #: Share of webhooks never sent at all; the task still completes and is pollable.
    drop_rate: float = 0.0
    #: Fixed delay before a webhook leaves, plus a random 0..jitter (reorders deliveries).
    delivery_delay_s: float = 0.0
    delivery_jitter_s: float = 0.0
    #: Share of submits refused with ``submit_error_status``; no task is created.
    submit_error_rate: float = 0.0
    submit_error_status: int = 429
    retry_after_s: int | None = None
    #: Share of submits that create the task (and send its webhook) but answer unclearly:
    #: ``malformed`` (a 200 whose body is cut off), or a 502/504 from a gateway.
    submit_unclear_rate: float = 0.0
    submit_unclear_answer: str = "malformed"
    #: Share of task deletes answered 503 (nothing deleted): a client must retry them.
    delete_error_rate: float = 0.0
    #: The account's rate limit: submits per ``rate_window_s`` (a fixed window, reset at
    #: its end, as WaveSpeed's per minute); above it, 429 with Retry-After. None: no limit.
    rate_limit: int | None = None
    rate_window_s: float = 60.0
    #: Tasks running at once; the others wait in ``created`` (they queue, not fail).
    max_concurrent: int | None = None
    #: What ``GET /api/v3/account/balance`` answers, in USD.
    balance_usd: float = 1000.0
    #: Serve outputs with this Content-Encoding (``gzip``), compressed, as a CDN may.
    output_encoding: str | None = None
    #: Redeliveries after a failed webhook attempt (WaveSpeed documents 3).
    webhook_retries: int = 3
    webhook_backoff_s: float = 1.0
    webhook_timeout_s: float = 10.0
    #: How long ``enable_sync_mode`` holds the request before answering "timed out".
    sync_timeout_s: float = 60.0
    #: Outputs disappear this long after completion (the real API keeps them 7 days).
    output_ttl_s: float | None = None
    #: Size of every video/mesh output when set: a large file streamed, never held.
    large_output_bytes: int | None = None
    #: Seed of the random generator behind every rate above.
    rng_seed: int | None = None
    #: Model ids whose tasks always fail (in addition to ``failure_rate``).
    fail_models: tuple[str, ...] = field(default=())
    #: Model ids whose images and videos come back at half the size asked.
    wrong_size_models: tuple[str, ...] = field(default=())
    #: Model ids whose outputs are cut short (the first 60 % of their bytes).
    truncate_models: tuple[str, ...] = field(default=())
    #: Model ids whose outputs the provider flags (``has_nsfw_contents: [true]``).
    nsfw_models: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in _RATES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FaultError(f"{name} must be in 0..1, got {value}")
        for name in ("latency_s", "delivery_delay_s", "delivery_jitter_s", "webhook_backoff_s"):
            if getattr(self, name) < 0:
                raise FaultError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.webhook_timeout_s <= 0 or self.sync_timeout_s <= 0:
            raise FaultError("webhook_timeout_s and sync_timeout_s must be > 0")
        if not 0 <= self.webhook_retries <= 20:
            raise FaultError(f"webhook_retries must be in 0..20, got {self.webhook_retries}")
        if not 1 <= self.duplicate_count <= 20:
            raise FaultError(f"duplicate_count must be in 1..20, got {self.duplicate_count}")
        if self.submit_error_status not in (429, 500, 502, 503, 504):
            raise FaultError(
                f"submit_error_status must be 429 or a 5xx, got {self.submit_error_status}"
            )
        if self.submit_unclear_answer not in ("malformed", "502", "504"):
            raise FaultError(
                "submit_unclear_answer must be malformed, 502 or 504, "
                f"got {self.submit_unclear_answer!r}"
            )
        if self.output_encoding not in (None, "gzip"):
            raise FaultError(f"output_encoding must be gzip or null, got {self.output_encoding!r}")
        self._check_account()
        if self.large_output_bytes is not None and self.large_output_bytes < 1:
            raise FaultError("large_output_bytes must be positive")

    def updated(self, changes: Mapping[str, Any]) -> Faults:
        """A copy with ``changes`` applied, each checked against the field's type."""
        known = {f.name: f for f in fields(self)}
        clean: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise FaultError(f"unknown fault {name!r}; known: {', '.join(sorted(known))}")
            clean[name] = _coerce(name, known[name].type, value)
        return dataclasses.replace(self, **clean)

    def _check_account(self) -> None:
        """The account's limits and balance."""
        for name in ("rate_limit", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FaultError(f"{name} must be >= 1 or null, got {value}")
        if self.rate_window_s <= 0:
            raise FaultError(f"rate_window_s must be > 0, got {self.rate_window_s}")
        if self.balance_usd < 0:
            raise FaultError(f"balance_usd must be >= 0, got {self.balance_usd}")

    def at_level(self, level: str) -> Faults:
        """The limits of a WaveSpeed account level (bronze, silver, gold, ultra)."""
        if level not in ACCOUNT_LEVELS:
            raise FaultError(
                f"account level must be one of {', '.join(ACCOUNT_LEVELS)}, got {level!r}"
            )
        per_minute, concurrent = ACCOUNT_LEVELS[level]
        return dataclasses.replace(
            self, rate_limit=per_minute, rate_window_s=60.0, max_concurrent=concurrent
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    kind = str(annotation)
    if value is None:
        if "None" in kind:
            return None
        raise FaultError(f"{name} may not be null")
    if kind.startswith("tuple"):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise FaultError(f"{name} must be a list of strings")
        return tuple(value)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise FaultError(f"{name} must be a boolean")
        return value
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise FaultError(f"{name} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"{name} must be a number")
    if kind.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise FaultError(f"{name} must be an integer")
        return int(value)
    return float(value)
