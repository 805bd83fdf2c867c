"""Webhook signature schemes: WaveSpeed "v3" and Standard Webhooks "v1".

Both sign ``{webhook-id}.{webhook-timestamp}.{raw body}`` with HMAC-SHA256 and
carry it in the same three headers; they differ in the key (v3 uses the secret
after ``whsec_`` as UTF-8 bytes, v1 base64-decodes it) and the digest encoding
(v3 lowercase hex, v1 base64). Pure functions: the clock is a parameter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from pipelines.errors import WebhookVerificationError
from pipelines.secrets import Secret

ID_HEADER: Final = "webhook-id"
TIMESTAMP_HEADER: Final = "webhook-timestamp"
SIGNATURE_HEADER: Final = "webhook-signature"
DEFAULT_TOLERANCE_S: Final = 300
_PREFIX: Final = "whsec_"


@dataclass(frozen=True, slots=True)
class VerifiedDelivery:
    """What a valid signature vouches for."""

    webhook_id: str
    timestamp: int


class SignatureScheme(Protocol):
    """One way of turning (secret, signed content) into a header entry."""

    version: str

    def digest(self, secret: str, content: bytes) -> str: ...


def _strip_prefix(secret: str) -> str:
    return secret[len(_PREFIX) :] if secret.startswith(_PREFIX) else secret


class WaveSpeedV3:
    """WaveSpeed: key is the secret minus ``whsec_``, as UTF-8 (not base64-decoded); hex."""

    version = "v3"

    def digest(self, secret: str, content: bytes) -> str:
        key = _strip_prefix(secret).encode()
        return hmac.new(key, content, hashlib.sha256).hexdigest()


class StandardWebhooksV1:
    """Standard Webhooks (Replicate, OpenAI): key is base64-decoded; base64 digest."""

    version = "v1"

    def digest(self, secret: str, content: bytes) -> str:
        encoded = _strip_prefix(secret)
        try:
            # Secrets are often stored without their trailing '=' padding.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as exc:
            raise WebhookVerificationError("bad_secret") from exc
        return base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


WAVESPEED_V3: Final = WaveSpeedV3()
STANDARD_V1: Final = StandardWebhooksV1()


def signed_content(webhook_id: str, timestamp: int | str, body: bytes) -> bytes:
    return f"{webhook_id}.{timestamp}.".encode() + body


def sign(
    body: bytes,
    *,
    secret: str,
    webhook_id: str,
    timestamp: int,
    scheme: SignatureScheme = WAVESPEED_V3,
) -> dict[str, str]:
    """Headers a sender attaches to ``body``."""
    sig = scheme.digest(secret, signed_content(webhook_id, timestamp, body))
    return {
        ID_HEADER: webhook_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"{scheme.version},{sig}",
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        # aiohttp's CIMultiDictProxy is case-insensitive; a plain dict may not be.
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if not value:
        raise WebhookVerificationError("missing_header", detail=name)
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[Secret],
    *,
    now: float,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    scheme: SignatureScheme = WAVESPEED_V3,
) -> VerifiedDelivery:
    """Check ``body`` was signed by one of ``secrets`` within ``tolerance_s`` of ``now``.

    Raises WebhookVerificationError with a machine-readable ``reason``.
    """
    if not secrets:
        raise WebhookVerificationError("no_secret_configured")
    webhook_id = _header(headers, ID_HEADER)
    # Ids are short printable text; anything else (control bytes, undecodable bytes that
    # arrive as surrogates) cannot have been signed and must not reach the encoder.
    if len(webhook_id) > 256 or not webhook_id.isprintable() or not _encodable(webhook_id):
        raise WebhookVerificationError("bad_webhook_id")
    raw_ts = _header(headers, TIMESTAMP_HEADER)
    raw_sig = _header(headers, SIGNATURE_HEADER)
    if not raw_ts.isascii() or not raw_ts.isdigit() or len(raw_ts) > 12:
        raise WebhookVerificationError("bad_timestamp")
    timestamp = int(raw_ts)
    # Both directions: a future timestamp is as suspicious as a stale one.
    if timestamp < now - tolerance_s:
        raise WebhookVerificationError("stale_timestamp")
    if timestamp > now + tolerance_s:
        raise WebhookVerificationError("future_timestamp")

    # Rotation-friendly: the header may carry several space-separated entries.
    candidates = [
        sig
        for version, _, sig in (entry.partition(",") for entry in raw_sig.split())
        if version == scheme.version and sig
    ]
    if not candidates:
        raise WebhookVerificationError("bad_signature_header")
    content = signed_content(webhook_id, raw_ts, body)
    matched = False
    for secret in secrets:
        expected = scheme.digest(secret.reveal(), content).encode()
        for candidate in candidates:
            # Evaluate every pair so timing does not reveal which secret matched.
            matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    if not matched:
        raise WebhookVerificationError("bad_signature")
    return VerifiedDelivery(webhook_id=webhook_id, timestamp=timestamp)
