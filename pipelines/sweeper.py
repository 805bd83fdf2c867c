"""Reconciliation: the safety net under webhooks, never the main path.

A stage silent past its callback deadline is asked about once
(``GET /api/v3/predictions/{id}/result``). A finished task is applied through the same
idempotent transition as a webhook, so a webhook and the sweeper racing on one task
make one transition. A task still running pushes the deadline out, up to the hard
limit; past it the stage times out (its task is deleted at the provider) and its retry
policy decides. A run past its own ``deadline`` is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from pipelines.backoff import backoff_s
from pipelines.engine import result_event
from pipelines.errors import InvalidTransitionError, ProviderError
from pipelines.metrics import RECONCILE_POLLS
from pipelines.providers import WaveSpeedClient
from pipelines.state import CancelRequested, Event, TaskFailed, TaskProcessing
from pipelines.store import DueStage, Store
from pipelines.transitions import iso

log = structlog.get_logger("wavechain.sweeper")


@dataclass(frozen=True, slots=True)
class SweeperConfig:
    interval_s: float = 5.0
    #: How far a running task's deadline moves each time it is found still running.
    extend_s: float = 60.0
    #: How long a claimed stage is hidden from other sweepers while it is asked about.
    claim_s: float = 30.0
    batch: int = 50
    #: One sweeper at a time across processes and replicas holds this lease (renewed each
    #: round: at least three intervals).
    lease_s: float = 15.0


class Sweeper:
    def __init__(
        self,
        store: Store,
        wavespeed: WaveSpeedClient,
        config: SweeperConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_iteration: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self._store = store
        self._wavespeed = wavespeed
        self.config = config
        self._clock = clock
        self._holder = f"sweeper-{uuid.uuid4().hex[:12]}"
        self._on_iteration = on_iteration or (lambda error: None)
        self.polls = 0
        self.applied = 0

    async def run(self) -> None:
        """Sweep every ``interval_s`` while holding the sweeper lease; a failed round is
        logged and retried after a backoff, never the end of the loop."""
        try:
            await self._run()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._store.release_lease("sweeper", self._holder)
            raise

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                held = await self._store.hold_lease(
                    "sweeper", self._holder, now=self._clock(), ttl_s=self.config.lease_s
                )
                if held:
                    await self.sweep_once()
                failures = 0
                self._on_iteration(None)
                delay = self.config.interval_s
            except Exception as exc:  # the store or provider hiccuped: log, back off, go on
                failures += 1
                log.exception("reconcile.sweep_failed")
                self._on_iteration(exc)
                delay = max(self.config.interval_s, backoff_s(failures, base=0.5, cap=5.0))
            await asyncio.sleep(delay)

    async def sweep_once(self) -> int:
        """Ask about stages silent past their deadline, and cancel runs past theirs."""
        now = self._clock()
        for run_id, deadline in await self._store.overdue_runs(now=now, limit=self.config.batch):
            await self._cancel_overdue(run_id, deadline)
        due = await self._store.claim_due_stages(
            now=now, limit=self.config.batch, lease_s=self.config.claim_s
        )
        await asyncio.gather(*(self._reconcile(stage) for stage in due))
        return len(due)

    async def _cancel_overdue(self, run_id: str, deadline: float) -> None:
        """A run's deadline passed: cancel what still runs (the transition deletes the
        tasks at the provider). A run that ended meanwhile is left as it is."""
        reason = f"run deadline passed ({iso(deadline)})"
        try:
            decision = await self._store.apply(
                run_id, CancelRequested(reason=reason), now=self._clock()
            )
        except InvalidTransitionError:
            return
        if decision.changed:
            log.warning("run.deadline_passed", run_id=run_id, deadline=iso(deadline))

    async def _reconcile(self, due: DueStage) -> None:
        with structlog.contextvars.bound_contextvars(
            run_id=due.run_id, stage=due.stage, attempt=due.attempt, task_id=due.task_id
        ):
            now = self._clock()
            if due.task_id is None or due.provider != "wavespeed":
                # Nothing to ask a provider about (a lost submit answer with no task id,
                # or a synchronous provider): the callback never came.
                if now >= due.hard_deadline:
                    await self._time_out(due, "no callback and no task id (submit answer lost)")
                return
            try:
                self.polls += 1
                prediction = await self._wavespeed.get_result(due.task_id)
            except ProviderError as exc:
                RECONCILE_POLLS.labels("poll_failed").inc()
                log.warning("reconcile.poll_failed", error=str(exc))
                if now >= due.hard_deadline:
                    await self._time_out(due, f"timed out; last poll failed: {exc}")
                return  # the claim expires and the stage is asked about again
            event: Event = result_event(due.stage, due.attempt, prediction)
            if isinstance(event, TaskProcessing):
                RECONCILE_POLLS.labels("running").inc()
                if now >= due.hard_deadline:
                    await self._time_out(due, f"timed out: task still {prediction.status}")
                    return
                await self._store.apply(due.run_id, event, now=now)
                at = min(now + self.config.extend_s, due.hard_deadline)
                await self._store.extend_deadline(due.run_id, due.stage, due.attempt, at)
                log.info("reconcile.still_running", task_status=prediction.status)
                return
            RECONCILE_POLLS.labels("completed" if prediction.completed else "failed").inc()
            decision = await self._store.apply(due.run_id, event, now=now)
            self.applied += int(decision.changed)
            log.info("reconcile.applied", task_status=prediction.status, changed=decision.changed)

    async def _time_out(self, due: DueStage, error: str) -> None:
        RECONCILE_POLLS.labels("timed_out").inc()
        # The task may still run at the provider: the transition deletes it there.
        event = TaskFailed(
            due.stage, due.attempt, due.task_id or "", error, retryable=True, abandoned=True
        )
        await self._store.apply(due.run_id, event, now=self._clock())
        log.warning("reconcile.timed_out", error=error)
