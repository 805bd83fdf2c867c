"""Errors raised by the wavechain domain.

WavechainError
├── ConfigError                 a setting is missing or malformed (names the variable)
├── SpecError                   a pipeline file is invalid (names file, stage, field, rule)
├── WebhookVerificationError    a callback failed signature/timestamp checks (``reason``)
└── ProviderError               a provider call failed (``retryable``, ``status``)
"""

from __future__ import annotations


class WavechainError(Exception):
    """Base of every error wavechain raises on purpose."""


class ConfigError(WavechainError):
    """A configuration value is missing or invalid; the message names the variable."""


class SpecError(WavechainError):
    """A pipeline spec is invalid; the message names the file, stage, field and rule."""


class WebhookVerificationError(WavechainError):
    """A webhook failed verification. ``reason`` is a short, loggable code, never a secret."""

    def __init__(self, reason: str, *, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ProviderError(WavechainError):
    """A provider request failed.

    ``retryable`` is true for throttling, 5xx and transport failures; false for a
    request the provider refused (4xx), which no retry will fix.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)
