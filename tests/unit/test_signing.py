"""The WaveSpeed v3 verifier, against the worked vector in PROVIDERS.md and every failure mode."""

from __future__ import annotations

import pytest

from pipelines import signing
from pipelines.errors import WebhookVerificationError
from pipelines.secrets import Secret

SECRET = Secret("whsec_testsecret")
BODY = b'{"id":"abc"}'
VECTOR = "v3,2213a539cefb348ba13187b47f6871c433e477f75c8602c174ef5b8e2e02da4a"
TS = 1700000000


def headers(sig: str = VECTOR, ts: int | str = TS, wid: str = "msg_1") -> dict[str, str]:
    return {"webhook-id": wid, "webhook-timestamp": str(ts), "webhook-signature": sig}


def test_sign_reproduces_worked_vector() -> None:
    """The signer yields the documented v3 signature for the documented input."""
    out = signing.sign(BODY, secret=SECRET.reveal(), webhook_id="msg_1", timestamp=TS)
    assert out["webhook-signature"] == VECTOR


def test_key_keeps_no_prefix() -> None:
    """Using the whole 'whsec_…' string as key gives the documented wrong digest."""
    wrong = "8dde0a65da6049ae550400eeb86c1d3fe24d274363e5d09e5fc5c52b0468e61c"
    out = signing.sign(BODY, secret="whsec_whsec_testsecret", webhook_id="msg_1", timestamp=TS)
    assert out["webhook-signature"] == f"v3,{wrong}"
    with pytest.raises(WebhookVerificationError) as exc:
        signing.verify(BODY, headers(f"v3,{wrong}"), [SECRET], now=TS)
    assert exc.value.reason == "bad_signature"


def test_standard_webhooks_v1_vector() -> None:
    """The v1 scheme reproduces the Standard Webhooks signature of the same input."""
    out = signing.sign(
        BODY, secret=SECRET.reveal(), webhook_id="msg_1", timestamp=TS, scheme=signing.STANDARD_V1
    )
    assert out["webhook-signature"] == "v1,dEB22TdVYsKvEQ1Omz/mfIUQASd91YD9V4SGTv4Aqnw="


def test_verify_accepts_vector() -> None:
    """A genuine delivery verifies and reports its id and timestamp."""
    got = signing.verify(BODY, headers(), [SECRET], now=TS)
    assert got == signing.VerifiedDelivery(webhook_id="msg_1", timestamp=TS)


@pytest.mark.parametrize("skew", [-300, 0, 300])
def test_tolerance_edges_accepted(skew: int) -> None:
    """Exactly ±300 s from now is inside the window."""
    signing.verify(BODY, headers(), [SECRET], now=TS + skew)


@pytest.mark.parametrize(("skew", "reason"), [(301, "stale_timestamp"), (-301, "future_timestamp")])
def test_tolerance_edges_rejected(skew: int, reason: str) -> None:
    """301 s either way is refused, naming the direction."""
    with pytest.raises(WebhookVerificationError) as exc:
        signing.verify(BODY, headers(), [SECRET], now=TS + skew)
    assert exc.value.reason == reason


def test_tampered_body_rejected() -> None:
    """One changed byte of the body breaks the signature."""
    with pytest.raises(WebhookVerificationError) as exc:
        signing.verify(b'{"id":"abd"}', headers(), [SECRET], now=TS)
    assert exc.value.reason == "bad_signature"


def test_reserialised_body_rejected() -> None:
    """Signatures cover raw bytes: the same JSON with other spacing fails."""
    with pytest.raises(WebhookVerificationError):
        signing.verify(b'{"id": "abc"}', headers(), [SECRET], now=TS)


def test_wrong_secret_rejected() -> None:
    """A different secret fails."""
    with pytest.raises(WebhookVerificationError) as exc:
        signing.verify(BODY, headers(), [Secret("whsec_other")], now=TS)
    assert exc.value.reason == "bad_signature"


def test_changed_id_or_timestamp_rejected() -> None:
    """The id and timestamp are part of the signed content."""
    with pytest.raises(WebhookVerificationError):
        signing.verify(BODY, headers(wid="msg_2"), [SECRET], now=TS)
    with pytest.raises(WebhookVerificationError):
        signing.verify(BODY, headers(ts=TS + 1), [SECRET], now=TS)


def test_rotation_accepts_any_configured_secret() -> None:
    """With old and new secrets configured, a delivery signed by either verifies."""
    signing.verify(BODY, headers(), [Secret("whsec_new"), SECRET], now=TS)


def test_space_separated_entries() -> None:
    """A header listing several entries verifies when one of them matches."""
    sig = f"v1,AAAA v3,{'0' * 64} {VECTOR}"
    signing.verify(BODY, headers(sig), [SECRET], now=TS)


@pytest.mark.parametrize(
    ("hdrs", "reason"),
    [
        ({"webhook-timestamp": str(TS), "webhook-signature": VECTOR}, "missing_header"),
        ({"webhook-id": "msg_1", "webhook-signature": VECTOR}, "missing_header"),
        ({"webhook-id": "msg_1", "webhook-timestamp": str(TS)}, "missing_header"),
        (headers(wid="\udc80"), "bad_webhook_id"),
        (headers(wid="msg\n1"), "bad_webhook_id"),
        (headers(wid="m" * 257), "bad_webhook_id"),
        (headers(ts="17e8"), "bad_timestamp"),
        (headers(ts="-1"), "bad_timestamp"),
        (headers(ts="\uff11\uff17\uff10\uff10"), "bad_timestamp"),
        (headers("v1,abc"), "bad_signature_header"),
        (headers("2213a539cefb"), "bad_signature_header"),
        (headers("v3,"), "bad_signature_header"),
        (headers("v3,zz\u00e9"), "bad_signature"),
    ],
)
def test_malformed_headers(hdrs: dict[str, str], reason: str) -> None:
    """Every malformed header is refused with a reason code, never an unexpected exception."""
    with pytest.raises(WebhookVerificationError) as exc:
        signing.verify(BODY, hdrs, [SECRET], now=TS)
    assert exc.value.reason == reason


def test_no_secret_configured() -> None:
    """Verification never passes by default when no secret is configured."""
    with pytest.raises(WebhookVerificationError) as exc:
        signing.verify(BODY, headers(), [], now=TS)
    assert exc.value.reason == "no_secret_configured"


def test_headers_case_insensitive_for_plain_dict() -> None:
    """Header names are matched without regard to case."""
    upper = {k.title(): v for k, v in headers().items()}
    signing.verify(BODY, upper, [SECRET], now=TS)


def test_secret_never_in_repr() -> None:
    """A Secret's repr and str hide the value."""
    assert "testsecret" not in repr(SECRET) and "testsecret" not in str(SECRET)
