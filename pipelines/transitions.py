"""What a store writes for a transition, and what a webhook delivery does: pure policy.

The store backends only read and write. Everything they decide lives here, beside the
state machine, with no I/O and no clock of its own:

- ``plan(...)``: ``decide`` plus what to write for it: each changed stage row with its
  timings and reconciliation deadlines, the jobs its commands ask for, the outbox rows
  (event envelopes) it emits.
- ``webhook_verdict(...)``: what a verified delivery does to the attempt its token names:
  unknown token, not yet (the submit's answer is not committed), task mismatch,
  duplicate, or apply, adopting the callback's task id where the submit's answer was lost.
- ``Deadlines``: how long a submitted stage waits for its callback before the sweeper
  asks, and when it times out.
- ``event_envelope(...)``: the versioned JSON body of a lifecycle event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from pipelines.catalog import get_model
from pipelines.spec import Pipeline
from pipelines.state import (
    Decision,
    Delete,
    Emit,
    Event,
    Mirror,
    RunState,
    StageState,
    StageStatus,
    Submit,
    decide,
)

WebhookEffect = Literal[
    "applied", "no_effect", "duplicate", "unknown_token", "not_yet", "task_mismatch"
]
#: An attempt's state: its row is written ``sending`` before the submit leaves.
AttemptState = Literal["sending", "accepted", "unknown", "rejected", "deleted"]
#: The largest outputs list an event carries in full; inline outputs become references.
MAX_EVENT_OUTPUT_CHARS = 2048


def token_hash(token: str) -> str:
    """Tokens are stored hashed: a copy of the database does not let anyone forge callbacks."""
    return hashlib.sha256(token.encode()).hexdigest()


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


# Deadlines -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Reconciliation: a submitted stage that has not heard back by its deadline is asked
    about; one still running at its hard deadline times out."""

    callback_timeout_s: float = 600.0
    #: Without a stage timeout, the hard deadline is the callback wait times this.
    hard_timeout_factor: float = 4.0

    def for_stage(self, timeout_s: float | None) -> tuple[float, float]:
        """(silence before asking the provider, total time the task may take). A stage's
        ``timeout`` is its total; without one it is the callback wait times the factor."""
        wait = min(self.callback_timeout_s, timeout_s) if timeout_s else self.callback_timeout_s
        return wait, timeout_s or wait * self.hard_timeout_factor


#: A stage row's reconciliation deadlines after a transition: ``None`` leaves them as they
#: are; (None, None) clears them; (deadline, hard deadline) sets both.
DeadlineChange = tuple[float | None, float | None] | None
CLEAR: DeadlineChange = (None, None)


def deadline_change(
    old: StageState, new: StageState, *, now: float, wait: float, limit: float
) -> DeadlineChange:
    """A stage that becomes submitted must hear back by its deadline, or the sweeper asks;
    one that ends, waits for its mirror, or goes back to pending is no longer due."""
    if new.status is StageStatus.SUBMITTED and old.status is not StageStatus.SUBMITTED:
        return (now + wait, now + limit)
    if new.status.terminal or new.awaiting_mirror or new.status is StageStatus.PENDING:
        return CLEAR
    return None


# Transitions ---------------------------------------------------------------------------


class StageWrite(NamedTuple):
    """One stage row to update."""

    name: str
    state: StageState
    #: Set ``submitted_at`` to now (the stage became submitted).
    submitted: bool
    #: Set ``finished_at`` to now (the stage ended); otherwise it is cleared.
    finished: bool
    deadlines: DeadlineChange


class JobWrite(NamedTuple):
    """A job to enqueue; a job already there for the same (kind, stage, attempt) stays."""

    kind: Literal["submit", "mirror", "delete"]
    stage: str
    attempt: int
    run_after: float
    #: The stage's provider (the governor limits its submits).
    provider: str | None = None


class EventWrite(NamedTuple):
    """An outbox row."""

    event_id: str
    type: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Transition:
    decision: Decision
    stages: tuple[StageWrite, ...] = ()
    jobs: tuple[JobWrite, ...] = ()
    events: tuple[EventWrite, ...] = ()

    @property
    def changed(self) -> bool:
        return self.decision.changed


def plan(
    pipeline: Pipeline,
    before: RunState,
    event: Event,
    *,
    now: float,
    deadlines: Deadlines,
    new_id: Callable[[], str],
) -> Transition:
    """``decide``, and every row the store must write for it (nothing if unchanged)."""
    decision = decide(pipeline, before, event, now=now)
    if not decision.changed:
        return Transition(decision)
    after = decision.state
    stages = []
    for name, stage in after.stages.items():
        old = before.stages[name]
        if stage == old:
            continue
        wait, limit = deadlines.for_stage(pipeline.stages[name].timeout_s)
        stages.append(
            StageWrite(
                name,
                stage,
                submitted=stage.status is StageStatus.SUBMITTED,
                finished=stage.status.terminal,
                deadlines=deadline_change(old, stage, now=now, wait=wait, limit=limit),
            )
        )
    jobs = []
    events = []
    for command in decision.commands:
        if isinstance(command, Submit):
            model = get_model(pipeline.stages[command.stage].model)
            provider = model.provider if model is not None else None
            run_after = command.not_before or now
            jobs.append(JobWrite("submit", command.stage, command.attempt, run_after, provider))
        elif isinstance(command, Mirror):
            jobs.append(JobWrite("mirror", command.stage, command.attempt, now))
        elif isinstance(command, Delete):
            jobs.append(JobWrite("delete", command.stage, command.attempt, now))
        elif isinstance(command, Emit):
            body = event_envelope(pipeline, after, command, now=now, event_id=new_id())
            events.append(EventWrite(body["id"], command.type, body))
    return Transition(decision, tuple(stages), tuple(jobs), tuple(events))


def _event_outputs(outputs: Sequence[str]) -> list[str]:
    """Outputs as an event carries them: URLs in full; an inline (base64) output, which
    can be megabytes, as a short reference, so that an event stays far below SNS's
    256 KiB limit."""
    out = []
    for value in outputs:
        if value.startswith(("http://", "https://", "s3://")) and len(value) <= 2048:
            out.append(value)
        else:
            digest = hashlib.sha256(value.encode()).hexdigest()
            out.append(f"inline:sha256:{digest}:{len(value)}")
    return out


def event_envelope(
    pipeline: Pipeline, state: RunState, command: Emit, *, now: float, event_id: str
) -> dict[str, Any]:
    """The versioned JSON body of a lifecycle event."""
    stage = state.stages.get(command.stage) if command.stage else None
    model = pipeline.stages[command.stage].model if command.stage else None
    error = command.data.get("error")
    return {
        "version": 1,
        "id": event_id,
        "type": command.type,
        "time": iso(now),
        "run_id": state.run_id,
        "pipeline": pipeline.name,
        "stage": command.stage,
        "model": model,
        "task_id": stage.task_id if stage else None,
        "status": stage.status.value if stage else state.status.value,
        "outputs": _event_outputs(stage.mirrored or stage.outputs) if stage else [],
        "provider_outputs": _event_outputs(stage.outputs) if stage else [],
        "error": error[:4000] if isinstance(error, str) else error,
        "cached": stage.cached if stage else False,
        #: What the stage (for a stage's event) or the run has cost so far; None: unknown.
        #: Filled in by the store, from the spend ledger, in the same transaction.
        "cost_usd": None,
    }


# Webhooks ------------------------------------------------------------------------------


class AttemptRow(NamedTuple):
    """What the store knows of the attempt a callback's token names."""

    run_id: str
    stage: str
    attempt: int
    task_id: str | None
    state: str
    created_at: float


class WebhookVerdict(NamedTuple):
    """``effect`` when the delivery stops here; None when its event is to be applied
    (the effect is then ``applied`` or ``no_effect``). ``adopt``: record the callback's
    task id on the attempt (the submit's answer was lost or is overdue)."""

    effect: WebhookEffect | None
    adopt: bool = False


def webhook_verdict(
    attempt: AttemptRow | None,
    task_id: str,
    *,
    seen: bool,
    now: float,
    submit_timeout_s: float,
) -> WebhookVerdict:
    """What a verified delivery for ``task_id`` does to ``attempt``.

    ``seen``: a delivery with the same webhook id is recorded already. An attempt still
    ``sending`` is normally a submit whose answer is not committed yet (the provider
    retries on 503); once the submit is older than its own timeout, the process that
    sent it died before recording the answer, and the token (unguessable, bound to this
    attempt) proves the task is this attempt's: it is adopted.
    """
    if attempt is None:
        return WebhookVerdict("unknown_token")
    if attempt.task_id is None:
        if attempt.state == "sending" and now - attempt.created_at < submit_timeout_s:
            return WebhookVerdict("not_yet")
        adopt = True
    elif attempt.task_id != task_id:
        return WebhookVerdict("task_mismatch")
    else:
        adopt = False
    if seen:
        return WebhookVerdict("duplicate")
    return WebhookVerdict(None, adopt)
