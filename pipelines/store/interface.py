"""The store: one interface, two backends (``sqlite.py``, ``postgres.py``).

Every public method is one transaction. The engine, sweeper, relay and receiver talk to
this interface, never to a backend; decisions (what a transition writes, what a webhook
does, deadlines, the event envelope) are pure functions in ``pipelines.transitions``,
and a backend only reads and writes. Correctness under concurrency comes from the
database: unique constraints for deliveries, jobs and events, a version check on every
run transition, jobs and due stages claimed atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipelines import spec as specs
from pipelines.governor import Governor
from pipelines.state import Decision, Event
from pipelines.store.records import (
    NO_OPTIONS,
    CacheEntry,
    Charge,
    DueStage,
    Idempotency,
    IdempotentReplay,
    Job,
    OutboxRow,
    Pruned,
    RunOptions,
    RunPage,
    RunView,
    Spent,
    StageContext,
    SubmitContext,
    TaskRef,
    WebhookOutcome,
)
from pipelines.transitions import Deadlines


@dataclass(frozen=True, slots=True)
class StoreConfig:
    deadlines: Deadlines = field(default_factory=Deadlines)
    #: How long a submit may take (the provider client's timeout, plus a margin): an
    #: attempt still ``sending`` after this died with its process, and a callback on its
    #: token adopts the task id.
    submit_timeout_s: float = 60.0
    #: Parsed specs and run states kept in memory, most recently used first.
    cached_runs: int = 2048
    #: Bytes of stored spec JSON the parsed-spec cache may stand for.
    cached_spec_bytes: int = 64 * 1024 * 1024
    #: PostgreSQL: pooled connections per process (one more listens for the others).
    pool_size: int = 10
    #: Providers' account limits: their submit jobs are claimed only while there is room.
    governor: Governor = field(default_factory=Governor)


Listener = Callable[[], None]


class Store(Protocol):
    """Durable state: runs, stages, attempts, deliveries, jobs with leases, the outbox."""

    config: StoreConfig

    @property
    def stats(self) -> dict[str, int]:
        """Transactions (``batches``) and the operations they carried, since start."""

    async def start(self) -> None:
        """Connect and apply the schema's migrations (safely if several start at once)."""

    async def close(self) -> None: ...

    def listen(self, *, jobs: Listener | None = None, events: Listener | None = None) -> None:
        """Call ``jobs`` when new jobs may be due, ``events`` when events were added (by
        this process, or, where the backend can tell, by another)."""

    async def ping(self) -> None:
        """Raise if the database cannot be reached (readiness)."""

    # runs
    async def create_run(
        self,
        pipeline: specs.Pipeline,
        inputs: Mapping[str, Any],
        *,
        now: float,
        mirror: bool = False,
        idempotency: Idempotency | None = None,
        options: RunOptions = NO_OPTIONS,
    ) -> str:
        """The new run's id; with ``idempotency`` whose key already names a run, raises
        ``IdempotentReplay`` naming it, atomically (two requests with one key, on any
        replicas, make one run)."""
        ...

    async def run_for_key(self, key: str) -> IdempotentReplay | None:
        """The run an Idempotency-Key started, if any (read only; ``create_run`` is what
        decides, atomically)."""

    async def apply(
        self, run_id: str, event: Event, *, now: float, finish_job: int | None = None
    ) -> Decision:
        """Apply ``event`` to the run (and delete job ``finish_job``): one transaction."""

    async def webhook(
        self,
        *,
        provider: str,
        webhook_id: str,
        token: str,
        task_id: str,
        status: str,
        make_event: Callable[[str, int], Event | None],
        now: float,
    ) -> WebhookOutcome:
        """Resolve the token, record the delivery, apply the event: one transaction."""

    # submit jobs
    async def claim_jobs(self, *, now: float, limit: int, lease_s: float) -> list[Job]:
        """Lease up to ``limit`` due jobs; a submit job comes with its context. A submit
        job of a governed provider is leased only while its account has room (counted in
        this transaction, one claim at a time across replicas), higher priority first."""

    async def throttle(self, provider: str, *, now: float, for_s: float) -> float:
        """A 429 came back: lower the provider's rate (``governor.throttled``) for
        ``for_s`` seconds, for every replica. Returns the new multiplier."""

    async def submit_context(self, job: Job) -> SubmitContext: ...

    async def record_attempt(
        self,
        job: Job,
        token: str,
        *,
        provider: str,
        now: float,
        charge: Charge | None = None,
        cache_key: str | None = None,
    ) -> None:
        """Written (durably) before the request leaves: never re-sent blindly. With
        ``charge``, the attempt's price goes into the spend ledger in the same transaction,
        after the run's budget and the daily cap are checked against the ledger (raising
        ``BudgetExceededError``, nothing written): atomically across processes and
        replicas, so concurrent submits cannot together cross a cap."""

    async def accept_attempt(
        self,
        job: Job,
        token: str,
        task_id: str,
        events: Sequence[Event],
        *,
        now: float,
        cost_usd: float | None = None,
    ) -> Decision:
        """Record the provider's task id, finish the job, apply ``events``; ``cost_usd``:
        what the provider said the call cost, replacing the price in the ledger."""

    async def discard_attempt(self, job: Job) -> None:
        """Delete the attempt (and its charge) of a submit the provider proved it never
        took."""

    async def spent(self, *, since: float) -> Spent:
        """What the ledger holds since ``since``, over every run."""

    async def spend_report(self, *, since: float, by: str) -> list[dict[str, Any]]:
        """The ledger since ``since`` grouped ``by`` pipeline, model or day (UTC): each
        group's ``key``, ``usd`` (known), ``unknown`` (attempts without a price) and
        ``attempts``, largest first."""

    async def attempt_unknown(self, job: Job, *, now: float) -> None:
        """The submit may have created a task: keep the attempt and its token for the
        callback, drop the job, and give the stage its hard deadline."""

    async def attempt_rejected(self, job: Job) -> None:
        """The provider refused the submit: nothing was made, its charge becomes 0."""

    async def retry_job(self, job: Job, *, at: float, error: str) -> None: ...

    # delete jobs
    async def task_of(self, job: Job) -> TaskRef | None:
        """The task of the job's (run, stage, attempt), or None if no attempt was sent."""

    async def finish_delete(self, job: Job, *, deleted: bool) -> None:
        """Drop the delete job; with ``deleted``, mark its attempt ``deleted``."""

    # the result cache
    async def cached_result(self, key: str) -> CacheEntry | None: ...

    async def save_result(self, entry: CacheEntry, *, model: str, now: float) -> None:
        """Keep (or replace) the entry for its key."""

    async def forget_result(self, key: str) -> None:
        """Drop an entry whose objects are gone."""

    async def drop_job(self, job: Job) -> None: ...

    async def renew_lease(self, job: Job, *, until: float) -> None: ...

    async def stage_state(self, run_id: str, stage: str) -> StageContext: ...

    # reconciliation
    async def claim_due_stages(self, *, now: float, limit: int, lease_s: float) -> list[DueStage]:
        """Stages silent past their deadline; each is pushed ``lease_s`` ahead as a claim."""

    async def extend_deadline(self, run_id: str, stage: str, attempt: int, at: float) -> None: ...

    async def overdue_runs(self, *, now: float, limit: int) -> list[tuple[str, float]]:
        """Running runs past their deadline: (run id, deadline), earliest first."""

    # the outbox
    async def pending_events(self, *, limit: int) -> list[OutboxRow]:
        """Unsent events not parked, oldest first (due or waiting for a retry)."""

    async def mark_sent(self, seqs: Sequence[int], *, now: float) -> None: ...

    async def mark_failed(
        self, failures: Mapping[int, str], *, now: float, retry_at: Mapping[int, float | None]
    ) -> None:
        """Count a failed try of each event; ``retry_at`` None parks it (dead letter)."""

    async def parked_events(self) -> list[dict[str, Any]]: ...

    # singletons
    async def hold_lease(self, name: str, holder: str, *, now: float, ttl_s: float) -> bool:
        """Take or renew the named lease for ``holder``; False while another holds it."""

    async def release_lease(self, name: str, holder: str) -> None:
        """Give the named lease up (on shutdown), if ``holder`` holds it."""

    # retention
    async def prune(self, *, before: float) -> Pruned:
        """Delete deliveries, sent (or parked) events and ended runs' attempts older
        than ``before``."""

    # reads
    async def gauges(self) -> dict[str, Any]:
        """What /metrics reports of the whole store: ``pending_events``,
        ``oldest_pending_event_at`` (or None), ``parked_events``, ``runs`` by status."""

    async def get_run(self, run_id: str) -> RunView | None: ...

    async def list_runs(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        pipeline: str | None = None,
        cursor: str | None = None,
    ) -> RunPage: ...

    async def outbox(self, run_id: str | None = None) -> list[dict[str, Any]]: ...

    async def deliveries(self, run_id: str) -> list[dict[str, Any]]: ...
