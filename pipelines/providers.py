"""Provider clients on aiohttp: WaveSpeed v3 (webhooks) and the AI/ML API (synchronous).

Failures are classified for the engine:
- ``ProviderError(retryable=False)``: the provider refused the request (4xx); permanent.
- ``ProviderError(retryable=True)``: throttled (429), or the request never left (no
  connection): nothing was created, so asking again is safe.
- ``SubmitOutcomeUnknownError``: a submit whose answer does not prove either way (a
  timeout, a reset, a 5xx, a 200 that cannot be read). A task may exist and be charged:
  never re-sent blindly. Reads (results, the secret) treat 5xx as retryable.

Which providers a process may use is decided once, at start (``ProviderAccess``): a
provider with a key is live; one without a key is the emulator if its base URL is on
this machine, and off otherwise.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple
from urllib.parse import quote, urlsplit

import aiohttp

from pipelines.catalog import Provider
from pipelines.errors import ProviderError, SubmitOutcomeUnknownError
from pipelines.metrics import PROVIDER_REQUESTS
from pipelines.secrets import Secret

TERMINAL_FAILURES: Final = frozenset({"failed", "cancelled", "timeout", "deleted"})
_ERROR_CODE = re.compile(r"^\s*(\d{4})\b")


AccessMode = Literal["live", "emulator", "off"]
#: What a provider with no key but a local base URL is sent: the emulator takes any key.
EMULATOR_KEY: Final = Secret("emulator")


def is_loopback(url: str) -> bool:
    """True when ``url``'s host is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ProviderAccess:
    """How this process reaches one provider, decided once at start."""

    provider: Provider
    mode: AccessMode
    base_url: str
    #: The environment variable that holds the key, named when a run needs it.
    key_variable: str
    key: Secret | None = None

    @classmethod
    def resolve(
        cls, provider: Provider, *, key: Secret | None, base_url: str, key_variable: str
    ) -> ProviderAccess:
        if key:
            return cls(provider, "live", base_url, key_variable, key)
        if is_loopback(base_url):
            return cls(provider, "emulator", base_url, key_variable, EMULATOR_KEY)
        return cls(provider, "off", base_url, key_variable, None)


class Prediction(NamedTuple):
    """A provider's prediction. Immutable, as a named tuple rather than a frozen
    dataclass: one is built per delivery on the receiver's hot path, and a frozen
    dataclass's ``__init__`` (an ``object.__setattr__`` call per field) costs four times
    as much as a tuple's."""

    id: str
    status: str
    outputs: tuple[str, ...]
    error: str
    #: The provider flagged an output (``has_nsfw_contents``: one boolean per output).
    nsfw: bool = False
    #: The seed the provider reports it used (``input.seed``), when it says.
    seed: int | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def failed(self) -> bool:
        return self.status in TERMINAL_FAILURES

    @property
    def retryable(self) -> bool:
        """WaveSpeed task codes 1xxx mean "fix the request"; anything else may pass on retry."""
        match = _ERROR_CODE.match(self.error)
        return not (match and match[1].startswith("1"))


def parse_prediction(data: Any) -> Prediction:
    """The prediction object of an envelope's ``data`` or a webhook body. Raises ValueError."""
    # Once per delivery on the receiver's hot path: a decoded JSON object is a dict, so the
    # ABC check (a Python-level __instancecheck__) is only reached by other mappings.
    if type(data) is not dict and not isinstance(data, Mapping):
        raise ValueError("prediction must be a JSON object")
    task_id, status = data.get("id"), data.get("status")
    if not isinstance(task_id, str) or not task_id or len(task_id) > 200:
        raise ValueError("prediction.id must be a non-empty string")
    if not isinstance(status, str) or not status or len(status) > 50:
        raise ValueError("prediction.status must be a non-empty string")
    outputs = data.get("outputs") or []
    if not isinstance(outputs, list):
        raise ValueError("prediction.outputs must be a list of strings")
    for output in outputs:
        if not isinstance(output, str):
            raise ValueError("prediction.outputs must be a list of strings")
    error = data.get("error") or ""
    if not isinstance(error, str):
        error = str(error)
    if status == "completed" and not outputs:
        raise ValueError("a completed prediction must have outputs")
    flags = data.get("has_nsfw_contents")
    nsfw = type(flags) is list and True in flags  # (conservative: a flag of 1 counts)
    given = data.get("input")
    seed = given.get("seed") if type(given) is dict else None
    if type(seed) is not int:
        seed = None
    return Prediction(task_id, status, tuple(outputs), error[:2000], nsfw, seed)


def _key(access: ProviderAccess) -> Secret:
    if access.key is None:
        # Runs that need an unconfigured provider are refused at creation; this is only
        # reached by work of an older run, started when the key was set.
        raise ProviderError(f"{access.key_variable} is not set", retryable=False)
    return access.key


def _created(payload: Any) -> Prediction:
    """The task a 200 to a submit created. A 200 means a task exists (and is charged): if
    the answer cannot be read in full, its id is enough; without an id, the outcome is
    unknown (the callback on the attempt's token will name the task)."""
    data = payload.get("data") if isinstance(payload, Mapping) else None
    try:
        return parse_prediction(data)
    except ValueError as exc:
        task_id = data.get("id") if isinstance(data, Mapping) else None
        if isinstance(task_id, str) and 0 < len(task_id) <= 200:
            return Prediction(task_id, "created", (), "")
        raise SubmitOutcomeUnknownError(
            f"WaveSpeed submit: HTTP 200 with an unreadable answer ({exc}); a task exists",
            status=200,
        ) from exc


def _counted(provider: str, endpoint: str, status: int | None) -> None:
    PROVIDER_REQUESTS.labels(provider, endpoint, "error" if status is None else str(status)).inc()


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), 3600.0))
    except ValueError:
        return None


def _message(body: Any, fallback: str) -> str:
    if isinstance(body, Mapping):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])[:500]
    return fallback


async def _read_json(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return None


class _Answer(NamedTuple):
    status: int
    payload: Any
    reason: str
    headers: Mapping[str, str]

    def error(self, what: str, *, fallback: str = "") -> ProviderError:
        """The answer as an error: throttling and 5xx retryable, other refusals not."""
        message = _message(self.payload, fallback or self.reason)
        return ProviderError(
            f"WaveSpeed {what}: HTTP {self.status}: {message}",
            retryable=self.status == 429 or self.status >= 500,
            status=self.status,
            retry_after=_retry_after(self.headers),
        )


class WaveSpeedClient:
    def __init__(
        self, session: aiohttp.ClientSession, access: ProviderAccess, *, timeout_s: float = 30.0
    ) -> None:
        self._session = session
        self.access = access
        self._base = access.base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def _headers(self) -> dict[str, str]:
        key = _key(self.access)
        return {"Authorization": f"Bearer {key.reveal()}", "X-Client-Name": "wavechain"}

    async def submit(self, model: str, body: Mapping[str, Any], *, webhook: str) -> Prediction:
        """Create a task. Only an answer that proves no task was created is retryable
        (429, no connection); one that leaves it open (a timeout, a 5xx, a 200 whose body
        cannot be read) is ``SubmitOutcomeUnknownError``: never re-sent blindly."""
        url = f"{self._base}/api/v3/{model}?webhook={quote(webhook, safe='')}"
        try:
            async with self._session.post(
                url, json=dict(body), headers=self._headers(), timeout=self._timeout
            ) as resp:
                payload = await _read_json(resp)
                status = resp.status
                _counted("wavespeed", "submit", status)
                if status >= 500:
                    raise SubmitOutcomeUnknownError(
                        f"WaveSpeed submit: HTTP {status}: "
                        f"{_message(payload, resp.reason or '')}; the task may exist",
                        status=status,
                    )
                if status == 200:
                    return _created(payload)
                return self._envelope(resp, payload, "submit")
        except aiohttp.ClientConnectorError as exc:
            _counted("wavespeed", "submit", None)
            raise ProviderError(
                f"cannot connect to WaveSpeed: {exc.os_error}", retryable=True
            ) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            _counted("wavespeed", "submit", None)
            raise SubmitOutcomeUnknownError(f"no answer to submit: {type(exc).__name__}") from exc

    async def get_result(self, task_id: str) -> Prediction:
        url = f"{self._base}/api/v3/predictions/{quote(task_id, safe='')}/result"
        try:
            async with self._session.get(
                url, headers=self._headers(), timeout=self._timeout
            ) as resp:
                _counted("wavespeed", "result", resp.status)
                return self._envelope(resp, await _read_json(resp), "get result")
        except (TimeoutError, aiohttp.ClientError) as exc:
            _counted("wavespeed", "result", None)
            raise ProviderError(f"get result failed: {type(exc).__name__}", retryable=True) from exc

    async def _ask(self, method: str, path: str, endpoint: str) -> _Answer:
        """A request whose answer may be retried (nothing is created by asking): no answer
        is a retryable ProviderError; any HTTP answer is returned, counted."""
        try:
            async with self._session.request(
                method, f"{self._base}{path}", headers=self._headers(), timeout=self._timeout
            ) as resp:
                _counted("wavespeed", endpoint, resp.status)
                payload = await _read_json(resp)
                return _Answer(resp.status, payload, resp.reason or "", resp.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            _counted("wavespeed", endpoint, None)
            raise ProviderError(
                f"WaveSpeed {endpoint}: no answer ({type(exc).__name__})", retryable=True
            ) from exc

    async def delete(self, task_id: str) -> bool:
        """Delete (cancel) a task: True when the provider deleted it, False when it does not
        know it (404: gone already, or never made). Throttling, a 5xx and a lost answer are
        retryable (deleting twice is harmless); another refusal (401, 403) is not."""
        answer = await self._ask(
            "DELETE", f"/api/v3/predictions/{quote(task_id, safe='')}", "delete"
        )
        if answer.status in (200, 404):
            return answer.status == 200
        raise answer.error("delete")

    async def balance(self) -> float:
        """The account's balance in USD (``GET /api/v3/account/balance``)."""
        answer = await self._ask("GET", "/api/v3/account/balance", "balance")
        data = answer.payload.get("data") if isinstance(answer.payload, Mapping) else None
        value = data.get("balance") if isinstance(data, Mapping) else None
        if answer.status != 200 or isinstance(value, bool) or not isinstance(value, int | float):
            raise answer.error("balance", fallback="no balance in the answer")
        return float(value)

    async def webhook_secret(self) -> Secret:
        url = f"{self._base}/api/v3/webhook/secret"
        async with self._session.get(url, headers=self._headers(), timeout=self._timeout) as resp:
            _counted("wavespeed", "webhook_secret", resp.status)
            body = await _read_json(resp)
            if resp.status != 200 or not isinstance(body, Mapping):
                raise ProviderError(
                    f"webhook secret: HTTP {resp.status}", retryable=resp.status >= 500
                )
        data = body.get("data")
        secret = data.get("secret") if isinstance(data, Mapping) else None
        secret = secret or body.get("secret")
        if not isinstance(secret, str) or not secret.removeprefix("whsec_"):
            raise ProviderError("webhook secret: no secret in the answer", retryable=False)
        return Secret(secret)

    @staticmethod
    def _envelope(resp: aiohttp.ClientResponse, payload: Any, what: str) -> Prediction:
        status = resp.status
        if status == 429 or status >= 500:
            raise ProviderError(
                f"WaveSpeed {what}: HTTP {status}: {_message(payload, resp.reason or '')}",
                retryable=True,
                status=status,
                retry_after=_retry_after(resp.headers),
            )
        if status != 200:
            raise ProviderError(
                f"WaveSpeed {what}: HTTP {status}: {_message(payload, resp.reason or '')}",
                retryable=False,
                status=status,
            )
        data = payload.get("data") if isinstance(payload, Mapping) else None
        try:
            return parse_prediction(data)
        except ValueError as exc:
            raise ProviderError(
                f"WaveSpeed {what}: malformed answer: {exc}", retryable=True
            ) from exc


class Generation(NamedTuple):
    """What one AI/ML API call made, and what it said it cost (``meta.usage``)."""

    outputs: tuple[str, ...]
    credits_used: float | None = None


def _credits(payload: Mapping[str, Any]) -> float | None:
    meta = payload.get("meta")
    usage = meta.get("usage") if isinstance(meta, Mapping) else None
    value = usage.get("credits_used") if isinstance(usage, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


class AimlClient:
    """AI/ML API: one synchronous call returns the finished images."""

    def __init__(
        self, session: aiohttp.ClientSession, access: ProviderAccess, *, timeout_s: float = 300.0
    ) -> None:
        self._session = session
        self.access = access
        self._base = access.base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def generate(self, model: str, body: Mapping[str, Any]) -> Generation:
        url = f"{self._base}/v1/images/generations"
        headers = {"Authorization": f"Bearer {_key(self.access).reveal()}"}
        try:
            async with self._session.post(
                url, json={**body, "model": model}, headers=headers, timeout=self._timeout
            ) as resp:
                payload = await _read_json(resp)
                status = resp.status
                retry_after = _retry_after(resp.headers)
            _counted("aimlapi", "generate", status)
        except aiohttp.ClientConnectorError as exc:
            _counted("aimlapi", "generate", None)
            raise ProviderError(
                f"cannot connect to AI/ML API: {exc.os_error}", retryable=True
            ) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            _counted("aimlapi", "generate", None)
            raise SubmitOutcomeUnknownError(
                f"no answer from AI/ML API: {type(exc).__name__}"
            ) from exc
        if status >= 500:  # the images may have been made and charged
            raise SubmitOutcomeUnknownError(
                f"AI/ML API: HTTP {status}: {_message(payload, 'error')}", status=status
            )
        if status != 200:
            raise ProviderError(
                f"AI/ML API: HTTP {status}: {_message(payload, 'error')}",
                retryable=status == 429,
                status=status,
                retry_after=retry_after,
            )
        items = payload.get("data") if isinstance(payload, Mapping) else None
        if not isinstance(items, list) or not items:
            raise SubmitOutcomeUnknownError("AI/ML API: HTTP 200 with no images", status=200)
        outputs = []
        for item in items:
            url_value = item.get("url") if isinstance(item, Mapping) else None
            if not isinstance(url_value, str) or not url_value:
                raise ProviderError("AI/ML API: an image has no url", retryable=False)
            outputs.append(url_value)
        return Generation(tuple(outputs), _credits(payload))
