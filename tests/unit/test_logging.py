"""Log redaction: no secret, token, key or presigned signature reaches a log line."""

from __future__ import annotations

from service.logging import REDACTED, redact, scrub


def test_secret_looking_keys_are_dropped() -> None:
    """Values under secret-like keys are replaced whatever they contain."""
    event = {"event": "x", "api_key": "k", "webhook_secret": "s",
             "Authorization": "Bearer abc", "token": "t", "count": 3}  # fmt: skip
    out = redact(None, "info", event)
    assert out["api_key"] == out["webhook_secret"] == out["Authorization"] == REDACTED
    assert out["token"] == REDACTED and out["count"] == 3


def test_credentials_inside_strings_are_scrubbed() -> None:
    """Presigned signatures, webhook tokens, bearer keys and whsec_ secrets are cut from text."""
    text = (
        "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA/x&X-Amz-Signature=deadbeef "
        "POST /webhooks/wavespeed/AbCdEfGhIjKlMnOp123 Bearer sk-live-123 whsec_c2VjcmV0"
    )
    out = scrub(text)
    for leaked in ("deadbeef", "AKIA", "AbCdEfGhIjKlMnOp123", "sk-live-123", "c2VjcmV0"):
        assert leaked not in out
    assert "/webhooks/wavespeed/" in out and "X-Amz-Signature=" in out


def test_nested_values_are_scrubbed() -> None:
    """Extras such as request lines and header dicts are cleaned too."""
    out = redact(None, "info", {"event": "x", "request": {"line": "POST /webhooks/wavespeed/"
                 "AbCdEfGhIjKlMnOp123 HTTP/1.1", "headers": {"Authorization": "Bearer k"}},
                 "list": ["whsec_c2VjcmV0"]})  # fmt: skip
    assert "AbCdEfGhIjKlMnOp123" not in str(out) and "Bearer k" not in str(out)
    assert "c2VjcmV0" not in str(out)


def test_every_value_type_under_a_secret_key_is_dropped_and_others_kept() -> None:
    """Numbers, None and booleans under secret-like keys go too; plain values stay as they are."""
    event = {"event": "x", "token": None, "api_key": 42, "secret": True, "count": 3,
             "ok": False, "route": "/webhooks/wavespeed/{token}", "ratio": 0.5}  # fmt: skip
    out = redact(None, "info", event)
    assert out["token"] == out["api_key"] == out["secret"] == REDACTED
    assert (out["count"], out["ok"], out["ratio"]) == (3, False, 0.5)
    assert out["route"] == "/webhooks/wavespeed/{token}"


def test_scrub_matches_credentials_whatever_their_case() -> None:
    assert scrub("auth: BEARER sk-live-123") == f"auth: BEARER {REDACTED}"
    assert scrub("GET /k?x-amz-signature=deadbeef") == f"GET /k?x-amz-signature={REDACTED}"
    assert scrub("msg_b1234 a8c3b0f1e2d34c5b") == "msg_b1234 a8c3b0f1e2d34c5b"
