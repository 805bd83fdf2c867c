"""What the store returns: plain records, the same whichever backend wrote them."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipelines import spec as specs
from pipelines.errors import SpecError
from pipelines.state import StageState
from pipelines.transitions import WebhookEffect, iso


class Spent(NamedTuple):
    """A sum of ledger rows: what is known, and how many attempts had no known price."""

    known_usd: float = 0.0
    unknown: int = 0

    @property
    def usd(self) -> float | None:
        """The total, or None when part of it is unknown (never shown as zero)."""
        return None if self.unknown else round(self.known_usd, 6)


@dataclass(frozen=True, slots=True)
class StageView:
    name: str
    model: str
    status: str
    attempt: int
    task_id: str | None
    outputs: list[str]
    mirrored: list[str]
    error: str
    submitted_at: float | None
    finished_at: float | None
    #: The stages this one waits for (the pipeline's graph).
    needs: list[str] = field(default_factory=list)
    #: What its attempts cost (the spend ledger).
    spent: Spent = field(default_factory=Spent)
    #: Served from the result cache (no provider call).
    cached: bool = False

    def as_json(self) -> dict[str, Any]:
        elapsed = (
            round(self.finished_at - self.submitted_at, 3)
            if self.finished_at is not None and self.submitted_at is not None
            else None
        )
        return {
            "name": self.name,
            "model": self.model,
            "needs": self.needs,
            "status": self.status,
            "attempt": self.attempt,
            "task_id": self.task_id,
            "outputs": self.mirrored or self.outputs,
            "provider_outputs": self.outputs,
            "mirrored_outputs": self.mirrored,
            "error": self.error or None,
            "cost_usd": self.spent.usd,
            "cached": self.cached,
            "timings": {
                "submitted_at": iso(self.submitted_at),
                "finished_at": iso(self.finished_at),
                "elapsed_s": elapsed,
            },
        }


@dataclass(frozen=True, slots=True)
class RunView:
    id: str
    pipeline: str
    status: str
    inputs: dict[str, Any]
    created_at: float
    updated_at: float
    stages: list[StageView]
    deadline_at: float | None = None
    budget_usd: float | None = None
    priority: int = 5
    concurrency_key: str | None = None
    concurrency_limit: int | None = None

    @property
    def spent(self) -> Spent:
        return Spent(
            sum(s.spent.known_usd for s in self.stages), sum(s.spent.unknown for s in self.stages)
        )

    def as_json(self) -> dict[str, Any]:
        spent = self.spent
        return {
            "id": self.id,
            "pipeline": self.pipeline,
            "status": self.status,
            "inputs": self.inputs,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "deadline_at": iso(self.deadline_at),
            "budget_usd": self.budget_usd,
            "cost_usd": spent.usd,
            "cost_known_usd": round(spent.known_usd, 6),
            "priority": self.priority,
            "concurrency_key": self.concurrency_key,
            "concurrency_limit": self.concurrency_limit,
            "stages": [s.as_json() for s in self.stages],
        }


@dataclass(frozen=True, slots=True)
class RunPage:
    """A page of runs, newest first, and the cursor of the next page (None: the last)."""

    runs: list[RunView]
    next_cursor: str | None


class Cursor(NamedTuple):
    """Where a page of runs ends: the last run's creation time and id (ties broken by id)."""

    created_at: float
    run_id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at, self.run_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created_at, run_id = json.loads(raw)
            if not isinstance(run_id, str) or isinstance(created_at, bool):
                raise ValueError
            return cls(float(created_at), run_id)
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            raise SpecError("cursor: not a cursor this API returned") from None


@dataclass(frozen=True, slots=True)
class SubmitContext:
    """All a submit job needs, read in one transaction."""

    pipeline: specs.Pipeline
    inputs: dict[str, Any]
    stage: StageState
    #: Succeeded upstream stages (their provider outputs and mirrored copies).
    upstream: dict[str, StageState]
    cancelled: bool
    #: State of an attempt row left by an earlier try of this job, if any.
    previous_attempt: str | None


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    run_id: str
    stage: str
    attempt: int
    tries: int
    #: For a submit job, what it needs, read in the transaction that claimed it.
    context: SubmitContext | None = field(default=None, compare=False, repr=False)
    #: When the job became due: for a stage's first submit, when the event that made it
    #: ready was received (a delivery, or the run's creation); after a failure, the end
    #: of its backoff.
    due_at: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class DueStage:
    """A submitted stage silent past its deadline, claimed for reconciliation."""

    run_id: str
    stage: str
    attempt: int
    task_id: str | None
    status: str
    hard_deadline: float
    #: The provider of the stage's current attempt (``wavespeed`` can be asked about it).
    provider: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    run_id: str
    body: dict[str, Any]
    #: Publish attempts that failed so far.
    tries: int = 0
    #: Not to be tried again before this time (after a failure).
    not_before: float | None = None


class StageContext(NamedTuple):
    """What a job about to work on a stage reads: its model, state, and the run's cancel."""

    model: str
    stage: StageState
    cancelled: bool


class TaskRef(NamedTuple):
    """The provider task a job's attempt made, as far as the store knows it."""

    provider: str
    #: None while the submit's answer is not in (``sending``), or if it was lost.
    task_id: str | None
    state: str
    #: The result cache's key of the attempt's input, when its stage may be cached.
    cache_key: str | None = None


class CacheEntry(NamedTuple):
    """An earlier stage's outputs for a cache key: the provider's and our copies."""

    key: str
    run_id: str
    stage: str
    outputs: tuple[str, ...]
    mirrored: tuple[str, ...]


class WebhookOutcome(NamedTuple):
    """What a delivery did. A named tuple: one is built per delivery on the hot path."""

    effect: WebhookEffect
    run_id: str | None = None
    stage: str | None = None


class Pruned(NamedTuple):
    """Rows deleted by one retention pass."""

    deliveries: int
    events: int
    attempts: int


class RunOptions(NamedTuple):
    """What a run is held to besides its spec: when it must end, and what it may spend."""

    deadline_at: float | None = None
    budget_usd: float | None = None
    #: 0..9, higher first when the provider governor makes submits wait.
    priority: int = 5
    #: At most ``concurrency_limit`` tasks of runs with this key in flight at once.
    concurrency_key: str | None = None
    concurrency_limit: int | None = None


NO_OPTIONS = RunOptions()


class Charge(NamedTuple):
    """What an attempt is about to cost, written to the spend ledger with it, and the daily
    cap it must stay under (the run's own budget is in the store)."""

    pipeline: str
    model: str
    #: The price table's price of this attempt; None: unknown.
    usd: float | None
    daily_cap_usd: float | None = None
    #: Where the current day (for the daily cap) began.
    day_start: float = 0.0


class Idempotency(NamedTuple):
    """A client's Idempotency-Key and a digest of the request it came with."""

    key: str
    request_hash: str


class IdempotentReplay(Exception):
    """Raised by ``create_run``: the key already names a run (nothing was written)."""

    def __init__(self, run_id: str, request_hash: str) -> None:
        super().__init__(run_id)
        self.run_id, self.request_hash = run_id, request_hash
