"""Logging, configured once by the entry point: structlog, JSON or console, redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"secret|token|api_?key|authorization|signature|password", re.I)
# Presigned URLs and webhook URLs carry credentials in the query string or path.
_URL_SECRETS = re.compile(
    r"((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|token)=)[^&\s\"']+",
    re.I,
)
_WEBHOOK_TOKEN = re.compile(r"(/webhooks/[a-z0-9_-]+/)[A-Za-z0-9_\-]{8,}")
_BEARER = re.compile(r"(Bearer\s+)\S+", re.I)
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")
REDACTED = "[redacted]"


def scrub(text: str) -> str:
    text = _URL_SECRETS.sub(rf"\1{REDACTED}", text)
    text = _WEBHOOK_TOKEN.sub(rf"\1{REDACTED}", text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    return _WHSEC.sub(REDACTED, text)


def _clean(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(key, v) for v in value]
    return value


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop values under secret-looking keys; scrub credentials out of every string, nested
    values included."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _clean(key, value)
    return event_dict


def configure_logging(*, json: bool | None = None, level: str = "INFO") -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    structlog.configure(
        # Drop records below the level before any processor spends time on them.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Extras (aiohttp's request line, headers) first, so redaction sees them too.
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # botocore at DEBUG prints request signatures; keep it quieter than ours.
    logging.getLogger("botocore").setLevel(max(logging.INFO, root.level))
