"""The run/stage state machine: ``decide(pipeline, state, event, now=) -> Decision``.

Rules of this module:
- It does no I/O and reads no clock: time comes in as ``now``. It imports nothing
  from aiohttp, boto3, anyio, sqlite3 or structlog (a unit test enforces this).
- Everything that affects transitions lives here. The store persists what
  ``decide`` returns; the engine carries out the commands.
- Duplicate and stale events (an old attempt, a task id that does not match, a
  stage already terminal) return the same state and no commands. Events that
  cannot happen in any valid history raise ``InvalidTransitionError``.

A stage's ``attempt`` counts submissions: 0 means not yet scheduled; each Submit
command carries the attempt it is for, and results for other attempts are stale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pipelines.backoff import backoff_s
from pipelines.checks import FAILED
from pipelines.errors import InvalidTransitionError
from pipelines.spec import Pipeline


class StageStatus(StrEnum):
    PENDING = "pending"  #: waiting for upstream, for its submit job, or for a retry
    SUBMITTED = "submitted"  #: the provider accepted the task
    PROCESSING = "processing"  #: the provider reported it running
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (StageStatus.SUCCEEDED, StageStatus.FAILED, StageStatus.CANCELLED)


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class StageState:
    status: StageStatus = StageStatus.PENDING
    attempt: int = 0
    task_id: str | None = None
    #: What the provider returned (URLs, or base64 for inline outputs).
    outputs: tuple[str, ...] = ()
    #: Our copies (s3:// URIs), once mirrored.
    mirrored: tuple[str, ...] = ()
    error: str = ""
    #: The last attempt before a manual retry: attempts up to it are history, and the
    #: stage is scheduled again when ``attempt`` moves past it.
    base_attempt: int = 0
    #: Its outputs came from the result cache (an earlier run's), not from the provider.
    cached: bool = False
    #: The seed the provider reported for the task that made its outputs.
    seed: int | None = None

    @property
    def scheduled(self) -> bool:
        return self.attempt > self.base_attempt

    @property
    def awaiting_mirror(self) -> bool:
        """The task finished and its outputs are being copied; no task event matters now."""
        return bool(self.outputs) and not self.status.terminal


@dataclass(frozen=True, slots=True)
class RunState:
    run_id: str
    stages: Mapping[str, StageState]
    cancelled: bool = False
    #: Outputs are copied to our bucket before a stage counts as succeeded.
    mirror: bool = False

    @property
    def status(self) -> RunStatus:
        """Derived, never stored independently of the stages."""
        if self.cancelled:
            return RunStatus.CANCELLED
        statuses = [s.status for s in self.stages.values()]
        if StageStatus.FAILED in statuses:
            return RunStatus.FAILED
        if all(s is StageStatus.SUCCEEDED for s in statuses):
            return RunStatus.SUCCEEDED
        return RunStatus.RUNNING


def initial_state(run_id: str, pipeline: Pipeline, *, mirror: bool = False) -> RunState:
    stages = {name: StageState() for name in pipeline.stages}
    return RunState(run_id=run_id, stages=stages, mirror=mirror)


# Events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequested:
    #: Why, when not asked for by a person (``run deadline passed``): in the run's event.
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RetryRequested:
    """Run ``from_stage`` and everything downstream again; without it, what failed."""

    from_stage: str | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    stage: str
    attempt: int
    task_id: str


@dataclass(frozen=True, slots=True)
class SubmitRejected:
    """The provider refused the request (4xx) or the rendered input was invalid."""

    stage: str
    attempt: int
    error: str


@dataclass(frozen=True, slots=True)
class TaskProcessing:
    stage: str
    attempt: int
    task_id: str


@dataclass(frozen=True, slots=True)
class TaskSucceeded:
    stage: str
    attempt: int
    task_id: str
    outputs: tuple[str, ...]
    #: The provider flagged an output (``has_nsfw_contents``).
    nsfw: bool = False
    #: The seed the provider reports it used, if it says.
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class TaskFailed:
    stage: str
    attempt: int
    task_id: str
    error: str
    #: False for errors no retry can fix (the provider's 1xxx codes).
    retryable: bool = True
    #: The task may still be running at the provider (we gave up waiting for it): delete
    #: it, so that it stops and is not charged further.
    abandoned: bool = False


@dataclass(frozen=True, slots=True)
class Mirrored:
    """Every output is in our bucket."""

    stage: str
    attempt: int
    uris: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MirrorFailed:
    """An output cannot be copied (forbidden host, too large, gone): permanent."""

    stage: str
    attempt: int
    error: str


@dataclass(frozen=True, slots=True)
class OutputRejected:
    """A quality check refused the stage's outputs (wrong size, cut short, ...): the
    stage's retry policy decides whether to ask again."""

    stage: str
    attempt: int
    error: str


@dataclass(frozen=True, slots=True)
class CacheHit:
    """An earlier run's outputs for the same input, copied for this stage: it succeeds
    without a provider call."""

    stage: str
    attempt: int
    outputs: tuple[str, ...]
    uris: tuple[str, ...]


StageEvent = (
    Submitted
    | SubmitRejected
    | TaskProcessing
    | TaskSucceeded
    | TaskFailed
    | Mirrored
    | MirrorFailed
    | OutputRejected
    | CacheHit
)
Event = Start | CancelRequested | RetryRequested | StageEvent


# Commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submit:
    stage: str
    attempt: int
    not_before: float | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    """Copy the stage's outputs into our bucket."""

    stage: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete the stage's task for ``attempt`` at the provider, if it has one that may
    still be running (after a cancel, a timeout, or a failed sibling)."""

    stage: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Emit:
    """A lifecycle event for the outbox (``run.started``, ``stage.succeeded``, …)."""

    type: str
    stage: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


Command = Submit | Mirror | Delete | Emit


@dataclass(frozen=True, slots=True)
class Decision:
    state: RunState
    commands: tuple[Command, ...] = ()
    #: False when the event changed nothing (duplicate, stale, or too late).
    changed: bool = True


# decide -------------------------------------------------------------------------------


def decide(pipeline: Pipeline, state: RunState, event: Event, *, now: float) -> Decision:
    if isinstance(event, Start):
        return _start(pipeline, state)
    if isinstance(event, CancelRequested):
        return _cancel(state, event)
    if isinstance(event, RetryRequested):
        return _retry(pipeline, state, event)
    return _stage_event(pipeline, state, event, now)


def _retry(pipeline: Pipeline, state: RunState, event: RetryRequested) -> Decision:
    if state.status is RunStatus.RUNNING:
        raise InvalidTransitionError(f"run {state.run_id} is still running")
    if event.from_stage is not None:
        if event.from_stage not in state.stages:
            raise InvalidTransitionError(f"run {state.run_id} has no stage {event.from_stage!r}")
        again = {event.from_stage} | pipeline.downstream(event.from_stage)
    else:
        ended = (StageStatus.FAILED, StageStatus.CANCELLED)
        again = {name for name, s in state.stages.items() if s.status in ended}
        if not again:
            raise InvalidTransitionError(
                f"run {state.run_id} has nothing to retry; name a stage with --from"
            )
    # Upstream stages keep their outputs (and mirrored copies): they are reused, not re-run.
    stages = {
        name: StageState(attempt=s.attempt, base_attempt=s.attempt) if name in again else s
        for name, s in state.stages.items()
    }
    stages, submits = _schedule_ready(pipeline, stages)
    new = dataclasses.replace(state, stages=stages, cancelled=False)
    retried = ",".join(sorted(again))
    return Decision(new, (Emit("run.retried", None, {"error": None, "stages": retried}), *submits))


def _unchanged(state: RunState) -> Decision:
    return Decision(state=state, commands=(), changed=False)


def _start(pipeline: Pipeline, state: RunState) -> Decision:
    if any(s.attempt for s in state.stages.values()) or state.cancelled:
        return _unchanged(state)
    stages, submits = _schedule_ready(pipeline, dict(state.stages))
    new = dataclasses.replace(state, stages=stages)
    return Decision(new, (Emit("run.started"), *submits))


def _in_flight(stage: StageState) -> bool:
    """A task for the stage's current attempt may exist and still be running: it was
    submitted, or its submit may be on its way (scheduled, not yet answered). A stage
    whose task finished (outputs in, awaiting its mirror) is not: it is paid for."""
    return stage.scheduled and not stage.status.terminal and not stage.awaiting_mirror


def _cancel(state: RunState, event: CancelRequested) -> Decision:
    if state.status is not RunStatus.RUNNING:
        if state.cancelled:
            return _unchanged(state)
        raise InvalidTransitionError(f"run {state.run_id} already {state.status}")
    deletes = tuple(Delete(n, s.attempt) for n, s in state.stages.items() if _in_flight(s))
    stages = {
        name: s if s.status.terminal else dataclasses.replace(s, status=StageStatus.CANCELLED)
        for name, s in state.stages.items()
    }
    new = dataclasses.replace(state, stages=stages, cancelled=True)
    data = {"error": event.reason} if event.reason else {}
    return Decision(new, (Emit("run.cancelled", None, data), *deletes))


def _stage_event(pipeline: Pipeline, state: RunState, event: StageEvent, now: float) -> Decision:
    current = state.stages.get(event.stage)
    if current is None:
        raise InvalidTransitionError(f"run {state.run_id} has no stage {event.stage!r}")
    if event.attempt > current.attempt:
        raise InvalidTransitionError(
            f"stage {event.stage!r} attempt {event.attempt} was never scheduled"
        )
    stale = event.attempt < current.attempt or event.attempt <= current.base_attempt
    if stale or current.status.terminal or state.cancelled:
        return _unchanged(state)  # an old attempt, or too late: recorded, no effect
    task_id = getattr(event, "task_id", None)
    if current.task_id is not None and task_id is not None and task_id != current.task_id:
        return _unchanged(state)
    if isinstance(event, Mirrored | MirrorFailed):
        return _mirror_event(pipeline, state, current, event)
    if isinstance(event, OutputRejected):
        if not current.awaiting_mirror:
            return _unchanged(state)
        return _retry_or_fail(pipeline, state, current, event.stage, event.error, now)
    if isinstance(event, CacheHit):
        if current.status is not StageStatus.PENDING or current.awaiting_mirror:
            return _unchanged(state)
        hit = dataclasses.replace(current, outputs=event.outputs, cached=True, error="")
        return _succeeded(pipeline, state, event.stage, hit, mirrored=event.uris)
    if current.awaiting_mirror:
        return _unchanged(state)  # the task's result is in; later task news is stale
    return _task_event(pipeline, state, current, event, now)


def _mirror_event(
    pipeline: Pipeline, state: RunState, current: StageState, event: Mirrored | MirrorFailed
) -> Decision:
    if not current.awaiting_mirror:
        return _unchanged(state)
    if isinstance(event, MirrorFailed):
        return _failed(state, event.stage, current, event.error, current.task_id)
    return _succeeded(pipeline, state, event.stage, current, mirrored=event.uris)


def _task_event(
    pipeline: Pipeline,
    state: RunState,
    current: StageState,
    event: Submitted | SubmitRejected | TaskProcessing | TaskSucceeded | TaskFailed,
    now: float,
) -> Decision:
    if isinstance(event, Submitted):
        if current.status is not StageStatus.PENDING:
            return _unchanged(state)
        stage = dataclasses.replace(current, status=StageStatus.SUBMITTED, task_id=event.task_id)
        return _with_stage(state, event.stage, stage, (Emit("stage.submitted", event.stage),))
    if isinstance(event, TaskProcessing):
        if current.status is StageStatus.PROCESSING:
            return _unchanged(state)
        stage = dataclasses.replace(current, status=StageStatus.PROCESSING, task_id=event.task_id)
        return _with_stage(state, event.stage, stage, ())
    if isinstance(event, TaskSucceeded):
        if event.nsfw and "nsfw" in pipeline.stages[event.stage].checks:
            error = f"{FAILED}: the provider flagged an output as NSFW (has_nsfw_contents)"
            return _retry_or_fail(pipeline, state, current, event.stage, error, now)
        done = dataclasses.replace(
            current,
            status=StageStatus.PROCESSING,
            task_id=event.task_id,
            outputs=event.outputs,
            seed=event.seed,
        )
        if state.mirror:
            return _with_stage(state, event.stage, done, (Mirror(event.stage, event.attempt),))
        return _succeeded(pipeline, state, event.stage, done, mirrored=())
    if isinstance(event, TaskFailed):
        policy = pipeline.stages[event.stage].retry
        used = current.attempt - current.base_attempt
        stop: tuple[Command, ...] = (Delete(event.stage, event.attempt),) if event.abandoned else ()
        if event.retryable and used < policy.attempts:
            delay = backoff_s(used, base=policy.backoff_s)
            retry = StageState(
                attempt=current.attempt + 1, base_attempt=current.base_attempt, error=event.error
            )
            submit = Submit(event.stage, retry.attempt, not_before=now + delay)
            return _with_stage(state, event.stage, retry, (*stop, submit))
        decision = _failed(state, event.stage, current, event.error, event.task_id)
        return dataclasses.replace(decision, commands=(*decision.commands, *stop))
    return _failed(state, event.stage, current, event.error, current.task_id)


def _retry_or_fail(
    pipeline: Pipeline, state: RunState, current: StageState, name: str, error: str, now: float
) -> Decision:
    """What came back was refused: another attempt if the retry policy has one left, else
    the stage fails (nothing downstream is bought either way)."""
    policy = pipeline.stages[name].retry
    used = current.attempt - current.base_attempt
    if used < policy.attempts:
        retry = StageState(
            attempt=current.attempt + 1, base_attempt=current.base_attempt, error=error
        )
        submit = Submit(
            name, retry.attempt, not_before=now + backoff_s(used, base=policy.backoff_s)
        )
        return _with_stage(state, name, retry, (submit,))
    return _failed(state, name, current, error, current.task_id)


def _with_stage(
    state: RunState, name: str, stage: StageState, commands: tuple[Command, ...]
) -> Decision:
    stages = {**state.stages, name: stage}
    return Decision(dataclasses.replace(state, stages=stages), commands)


def _succeeded(
    pipeline: Pipeline, state: RunState, name: str, stage: StageState, *, mirrored: tuple[str, ...]
) -> Decision:
    done = dataclasses.replace(stage, status=StageStatus.SUCCEEDED, mirrored=mirrored)
    stages, submits = _schedule_ready(pipeline, {**state.stages, name: done})
    new = dataclasses.replace(state, stages=stages)
    commands: list[Command] = [Emit("stage.succeeded", name), *submits]
    if new.status is RunStatus.SUCCEEDED:
        commands.append(Emit("run.succeeded"))
    return Decision(new, tuple(commands))


def _failed(
    state: RunState, name: str, current: StageState, error: str, task_id: str | None
) -> Decision:
    failed = dataclasses.replace(current, status=StageStatus.FAILED, error=error, task_id=task_id)
    # Fail fast: nothing not yet submitted will be, and siblings still running at the
    # provider (a fan-in's other branches) are deleted there, so nothing more is charged.
    # A sibling whose task finished keeps its outputs (mirrored, reused by a retry).
    deletes = [Delete(n, s.attempt) for n, s in state.stages.items() if n != name and _in_flight(s)]
    stages = {
        n: (
            failed
            if n == name
            else dataclasses.replace(s, status=StageStatus.CANCELLED)
            if s.status is StageStatus.PENDING or _in_flight(s)
            else s
        )
        for n, s in state.stages.items()
    }
    was_running = state.status is RunStatus.RUNNING
    new = dataclasses.replace(state, stages=stages)
    commands: list[Command] = [Emit("stage.failed", name, {"error": error})]
    if was_running:
        commands.append(Emit("run.failed", None, {"error": f"stage '{name}' failed: {error}"}))
    return Decision(new, (*commands, *deletes))


def _schedule_ready(
    pipeline: Pipeline, stages: dict[str, StageState]
) -> tuple[dict[str, StageState], list[Submit]]:
    submits: list[Submit] = []
    for name in pipeline.order():
        stage = stages[name]
        if stage.status is not StageStatus.PENDING or stage.scheduled:
            continue
        needs = pipeline.stages[name].needs
        if all(stages[n].status is StageStatus.SUCCEEDED for n in needs):
            stages[name] = dataclasses.replace(stage, attempt=stage.attempt + 1)
            submits.append(Submit(name, stage.attempt + 1))
    return stages, submits
