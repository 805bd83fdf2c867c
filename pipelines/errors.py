"""Errors raised by the wavechain domain.

WavechainError                      every error wavechain raises on purpose (``status_hint``)
├── ConfigError                     a setting is missing or malformed (names the variable)
├── SpecError                       a pipeline or request is invalid (names file, stage, field)
│   └── PipelineTooLargeError       over a configured limit (stages, size, nesting)
├── ProviderNotConfiguredError      a run needs a provider that has no key (names variable, stage)
├── InvalidTransitionError          an event no valid history produces (cancel an ended run)
├── IdempotencyKeyReusedError       an Idempotency-Key sent again with a different request
├── BudgetExceededError             a run or stage would cross a spending cap (names the cap)
├── ConcurrentUpdateError           another writer changed a run between read and write
├── WebhookVerificationError        a callback failed signature/timestamp checks (``reason``)
└── ProviderError                   a provider call failed (``retryable``, ``status``)
    └── SubmitOutcomeUnknownError   a submit may or may not have created (and charged) a task

``status_hint`` is the HTTP status a server answers when the error reaches a request
(h11's ``error_status_hint``): the domain never imports a web framework, and the app's
one middleware maps every error through it.
"""

from __future__ import annotations


class WavechainError(Exception):
    """Base of every error wavechain raises on purpose."""

    status_hint: int = 500


class ConfigError(WavechainError):
    """A configuration value is missing or invalid; the message names the variable."""


class SpecError(WavechainError):
    """A pipeline spec or request is invalid; the message names the file, stage, field, rule."""

    status_hint = 400


class PipelineTooLargeError(SpecError):
    """A pipeline is over a configured limit: stages, inline spec bytes, or nesting depth."""

    status_hint = 413


class ProviderNotConfiguredError(WavechainError):
    """A run has a stage whose provider has no API key; the message names both."""

    status_hint = 422


class InvalidTransitionError(WavechainError):
    """An event that no valid history can produce (unknown stage, cancel an ended run)."""

    status_hint = 409


class IdempotencyKeyReusedError(WavechainError):
    """An Idempotency-Key already names a run started by a different request."""

    status_hint = 422


class BudgetExceededError(WavechainError):
    """A run, or a stage about to be submitted, would cross a spending cap (the run's
    ``budget_usd`` or ``DAILY_BUDGET_USD``), or cannot be priced while one applies; the
    message names the cap, what is spent and what this would cost."""

    status_hint = 402


class ConcurrentUpdateError(WavechainError):
    """Another writer changed the run between our read and our guarded write; retry."""

    status_hint = 503


class WebhookVerificationError(WavechainError):
    """A webhook failed verification. ``reason`` is a short, loggable code, never a secret."""

    status_hint = 401

    def __init__(self, reason: str, *, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ProviderError(WavechainError):
    """A provider request failed.

    ``retryable`` is true when the provider proves nothing was created and asking again
    may work: throttling (429), or a connection refused before the request was sent.
    False for a request the provider refused (4xx), which no retry will fix.
    """

    status_hint = 502

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


class SubmitOutcomeUnknownError(ProviderError):
    """The submit may have created (and charged) a task, but the answer does not prove it
    either way: a timeout, a reset, a 5xx, or a 200 whose body cannot be read. Never
    re-sent blindly: the signed callback on the attempt's token, or reconciliation,
    settles it."""

    status_hint = 503

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message, retryable=False, status=status)
