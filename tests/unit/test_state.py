"""The run/stage state machine, driven with plain calls: no loop, no I/O, no fakes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import spec as specs
from pipelines.errors import InvalidTransitionError
from pipelines.state import (
    CacheHit,
    CancelRequested,
    Decision,
    Delete,
    Emit,
    Event,
    Mirror,
    Mirrored,
    MirrorFailed,
    RetryRequested,
    RunState,
    RunStatus,
    StageStatus,
    Start,
    Submit,
    SubmitRejected,
    Submitted,
    TaskFailed,
    TaskProcessing,
    TaskSucceeded,
    decide,
    initial_state,
)

IMG, I2V, MESH = (
    "wavespeed-ai/hunyuan-image-2.1",
    "wavespeed-ai/hunyuan-video/i2v",
    "wavespeed-ai/hunyuan3d/v2.1",
)
NOW = 1_000.0


def pipeline(retry: int = 1) -> specs.Pipeline:
    """image → (video, mesh) → final (fan-out then fan-in)."""
    return specs.parse(
        {
            "stages": {
                "image": {"model": IMG, "input": {"prompt": "p"}},
                "video": {
                    "model": I2V,
                    "input": {"image": "${stages.image.outputs[0]}"},
                    "retry": {"attempts": retry, "backoff": 2},
                },
                "mesh": {"model": MESH, "input": {"image": "${stages.image.outputs[0]}"}},
                "final": {
                    "model": MESH,
                    "input": {"image": "${stages.image.outputs[0]}"},
                    "needs": ["video", "mesh"],
                },
            }
        },
        where="test",
    )


def step(p: specs.Pipeline, state: RunState, event: Event) -> Decision:
    return decide(p, state, event, now=NOW)


def started(p: specs.Pipeline) -> RunState:
    return step(p, initial_state("r1", p), Start()).state


def submits(decision: Decision) -> list[tuple[str, int]]:
    return [(c.stage, c.attempt) for c in decision.commands if isinstance(c, Submit)]


def deletes(decision: Decision) -> list[tuple[str, int]]:
    return [(c.stage, c.attempt) for c in decision.commands if isinstance(c, Delete)]


def emits(decision: Decision) -> list[str]:
    return [c.type for c in decision.commands if isinstance(c, Emit)]


def finish(p: specs.Pipeline, state: RunState, stage: str) -> Decision:
    attempt = state.stages[stage].attempt
    state = step(p, state, Submitted(stage, attempt, f"t-{stage}-{attempt}")).state
    return step(p, state, TaskSucceeded(stage, attempt, f"t-{stage}-{attempt}", (f"u-{stage}",)))


def test_start_submits_only_roots() -> None:
    """Start schedules stages without needs and announces the run."""
    p = pipeline()
    d = step(p, initial_state("r1", p), Start())
    assert submits(d) == [("image", 1)] and emits(d) == ["run.started"]
    assert d.state.status is RunStatus.RUNNING


def test_start_twice_is_a_no_op() -> None:
    """A repeated Start changes nothing."""
    p = pipeline()
    s = started(p)
    d = step(p, s, Start())
    assert not d.changed and d.state == s and d.commands == ()


def test_fan_out_then_fan_in() -> None:
    """image's success submits video and mesh; final waits for both."""
    p = pipeline()
    d = finish(p, started(p), "image")
    assert sorted(submits(d)) == [("mesh", 1), ("video", 1)]
    d = finish(p, d.state, "video")
    assert submits(d) == []
    d = finish(p, d.state, "mesh")
    assert submits(d) == [("final", 1)]
    d = finish(p, d.state, "final")
    assert d.state.status is RunStatus.SUCCEEDED and emits(d)[-1] == "run.succeeded"


def test_submitted_then_processing_then_success() -> None:
    """The normal path records the task id and outputs."""
    p = pipeline()
    s = step(p, started(p), Submitted("image", 1, "t1")).state
    assert s.stages["image"].status is StageStatus.SUBMITTED and s.stages["image"].task_id == "t1"
    s = step(p, s, TaskProcessing("image", 1, "t1")).state
    assert s.stages["image"].status is StageStatus.PROCESSING
    s = step(p, s, TaskSucceeded("image", 1, "t1", ("u",))).state
    assert s.stages["image"].status is StageStatus.SUCCEEDED and s.stages["image"].outputs == ("u",)


def test_duplicate_success_is_a_no_op() -> None:
    """A second TaskSucceeded for the same task changes nothing and emits nothing."""
    p = pipeline()
    d = finish(p, started(p), "image")
    again = step(p, d.state, TaskSucceeded("image", 1, "t-image-1", ("u-image",)))
    assert not again.changed and again.state == d.state and again.commands == ()


def test_failure_after_success_does_not_roll_back() -> None:
    """A late 'failed' for a succeeded stage is ignored."""
    p = pipeline()
    d = finish(p, started(p), "image")
    late = step(p, d.state, TaskFailed("image", 1, "t-image-1", "boom"))
    assert not late.changed and late.state.stages["image"].status is StageStatus.SUCCEEDED


def test_processing_after_success_does_not_roll_back() -> None:
    """An out-of-order 'processing' after the result is ignored."""
    p = pipeline()
    d = finish(p, started(p), "image")
    late = step(p, d.state, TaskProcessing("image", 1, "t-image-1"))
    assert not late.changed


def test_result_before_submit_ack_is_applied() -> None:
    """A result on the attempt before its Submitted (answer lost) completes the stage."""
    p = pipeline()
    d = step(p, started(p), TaskSucceeded("image", 1, "t9", ("u",)))
    assert d.state.stages["image"].status is StageStatus.SUCCEEDED
    assert d.state.stages["image"].task_id == "t9"
    late_ack = step(p, d.state, Submitted("image", 1, "t9"))
    assert not late_ack.changed


def test_other_task_id_is_ignored() -> None:
    """A result naming another task than the recorded one has no effect."""
    p = pipeline()
    s = step(p, started(p), Submitted("image", 1, "t1")).state
    d = step(p, s, TaskSucceeded("image", 1, "t-other", ("u",)))
    assert not d.changed


def test_failure_without_retries_fails_run_and_deletes_siblings() -> None:
    """A failed stage fails the run once; stages not yet submitted are cancelled, and a
    sibling still running at the provider is cancelled and deleted there."""
    p = pipeline()
    d = finish(p, started(p), "image")
    s = step(p, d.state, Submitted("video", 1, "tv")).state
    s = step(p, s, Submitted("mesh", 1, "tm")).state
    d = step(p, s, TaskFailed("video", 1, "tv", "5000: boom"))
    assert d.state.status is RunStatus.FAILED
    assert d.state.stages["video"].error == "5000: boom"
    assert d.state.stages["final"].status is StageStatus.CANCELLED
    assert d.state.stages["mesh"].status is StageStatus.CANCELLED
    assert d.state.stages["mesh"].task_id == "tm"  # kept: the delete needs it
    assert emits(d) == ["stage.failed", "run.failed"]
    assert deletes(d) == [("mesh", 1)]  # not the failed task (it ended), not "final"
    late = step(p, d.state, TaskSucceeded("mesh", 1, "tm", ("u",)))
    assert not late.changed  # the deleted sibling's late callback changes nothing


def test_failure_keeps_a_sibling_whose_task_finished() -> None:
    """A sibling whose task completed (its copy under way) is paid for: not deleted."""
    p = pipeline()
    s = step(p, mirrored_run(p), TaskSucceeded("image", 1, "t1", ("u",))).state
    s = step(p, s, Mirrored("image", 1, ("s3://b/i.png",))).state
    s = step(p, s, TaskSucceeded("mesh", 1, "tm", ("https://cdn/m.glb",))).state
    d = step(p, s, TaskFailed("video", 1, "tv", "5000"))
    assert deletes(d) == []
    assert d.state.stages["mesh"].awaiting_mirror


def test_cancel_deletes_what_may_be_running() -> None:
    """Cancel deletes every stage whose task was submitted or may be on its way, and
    nothing else: not a stage never scheduled, not one whose task already finished."""
    p = pipeline()
    s = step(p, mirrored_run(p), TaskSucceeded("image", 1, "t1", ("u",))).state
    s = step(p, s, Mirrored("image", 1, ("s3://b/i.png",))).state
    s = step(p, s, Submitted("video", 1, "tv")).state  # mesh: scheduled, submit on its way
    d = step(p, s, CancelRequested(reason="run deadline passed"))
    assert sorted(deletes(d)) == [("mesh", 1), ("video", 1)]
    assert [c.data for c in d.commands if isinstance(c, Emit)] == [{"error": "run deadline passed"}]


def test_a_timed_out_task_is_deleted_and_retried() -> None:
    """A task abandoned by reconciliation (timed out) is deleted at the provider, whether
    its stage retries or fails."""
    p = pipeline(retry=2)
    s = finish(p, started(p), "image").state
    s = step(p, s, Submitted("video", 1, "tv")).state
    d = step(p, s, TaskFailed("video", 1, "tv", "timed out", abandoned=True))
    assert deletes(d) == [("video", 1)] and submits(d) == [("video", 2)]
    s = step(p, d.state, Submitted("video", 2, "tv2")).state
    d = step(p, s, TaskFailed("video", 2, "tv2", "timed out", abandoned=True))
    assert ("video", 2) in deletes(d) and d.state.status is RunStatus.FAILED
    ordinary = step(p, s, TaskFailed("video", 2, "tv2", "5000"))
    assert ("video", 2) not in deletes(ordinary)  # a task that failed ended by itself


def test_failure_cancels_scheduled_but_unsent_stage() -> None:
    """A stage scheduled but not yet accepted is cancelled, so its submit never leaves."""
    p = pipeline()
    s = finish(p, started(p), "image").state
    s = step(p, s, Submitted("video", 1, "tv")).state
    d = step(p, s, TaskFailed("video", 1, "tv", "5000"))
    assert d.state.stages["mesh"].status is StageStatus.CANCELLED
    assert not step(p, d.state, Submitted("mesh", 1, "tm")).changed


def test_retry_schedules_next_attempt_with_backoff() -> None:
    """With attempts left, a retryable failure re-submits after backoff * 2**(n-1)."""
    p = pipeline(retry=3)
    d = finish(p, started(p), "image")
    s = step(p, d.state, Submitted("video", 1, "tv1")).state
    d = step(p, s, TaskFailed("video", 1, "tv1", "5003"))
    assert d.commands == (Submit("video", 2, not_before=NOW + 2),)
    assert d.state.stages["video"].status is StageStatus.PENDING
    s = step(p, d.state, Submitted("video", 2, "tv2")).state
    d = step(p, s, TaskFailed("video", 2, "tv2", "5003"))
    assert d.commands == (Submit("video", 3, not_before=NOW + 4),)
    s = step(p, d.state, Submitted("video", 3, "tv3")).state
    d = step(p, s, TaskFailed("video", 3, "tv3", "5003"))
    assert d.state.status is RunStatus.FAILED


def test_non_retryable_failure_skips_retries() -> None:
    """A 1xxx error (fix the request) fails at once whatever the policy."""
    p = pipeline(retry=3)
    s = finish(p, started(p), "image").state
    s = step(p, s, Submitted("video", 1, "tv")).state
    d = step(p, s, TaskFailed("video", 1, "tv", "1402", retryable=False))
    assert d.state.stages["video"].status is StageStatus.FAILED


def test_late_result_of_old_attempt_is_ignored() -> None:
    """After a retry, a callback for attempt 1 has no effect."""
    p = pipeline(retry=2)
    s = finish(p, started(p), "image").state
    s = step(p, s, Submitted("video", 1, "tv1")).state
    s = step(p, s, TaskFailed("video", 1, "tv1", "5000")).state
    d = step(p, s, TaskSucceeded("video", 1, "tv1", ("u",)))
    assert not d.changed and d.state.stages["video"].attempt == 2


def test_submit_rejected_fails_stage() -> None:
    """A refused submit fails the stage and the run with the provider's message."""
    p = pipeline()
    d = step(p, started(p), SubmitRejected("image", 1, "HTTP 400: bad size"))
    assert d.state.stages["image"].status is StageStatus.FAILED
    assert d.state.stages["image"].error == "HTTP 400: bad size"
    assert d.state.status is RunStatus.FAILED


def test_cancel_stops_everything_and_late_results_do_nothing() -> None:
    """Cancel marks every unfinished stage cancelled; later callbacks change nothing."""
    p = pipeline()
    s = step(p, started(p), Submitted("image", 1, "t1")).state
    d = step(p, s, CancelRequested())
    assert d.state.status is RunStatus.CANCELLED and emits(d) == ["run.cancelled"]
    assert deletes(d) == [("image", 1)]
    assert all(st.status is StageStatus.CANCELLED for st in d.state.stages.values())
    late = step(p, d.state, TaskSucceeded("image", 1, "t1", ("u",)))
    assert not late.changed and submits(late) == []
    assert not step(p, d.state, CancelRequested()).changed


def test_cancel_of_finished_run_is_invalid() -> None:
    """A succeeded run cannot be cancelled; the state is left unchanged."""
    p = specs.parse({"stages": {"a": {"model": IMG, "input": {"prompt": "p"}}}}, where="t")
    s = finish(p, step(p, initial_state("r", p), Start()).state, "a").state
    with pytest.raises(InvalidTransitionError):
        step(p, s, CancelRequested())


@pytest.mark.parametrize(
    "event",
    [Submitted("nope", 1, "t"), Submitted("video", 1, "t"), TaskSucceeded("image", 2, "t", ())],
)
def test_impossible_events_raise(event: Event) -> None:
    """Unknown stages and never-scheduled attempts are errors, and the state is untouched."""
    p = pipeline()
    s = started(p)
    with pytest.raises(InvalidTransitionError):
        step(p, s, event)
    assert s == started(p)


def test_module_is_pure() -> None:
    """state.py imports nothing that does I/O."""
    tree = ast.parse(Path(specs.__file__).with_name("state.py").read_text())
    names = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert not names & {"aiohttp", "boto3", "anyio", "sqlite3", "structlog", "asyncio", "time"}


STAGES = ["image", "video", "mesh", "final"]
_stage, _attempt, _task = st.sampled_from(STAGES), st.integers(1, 2), st.sampled_from(["a", "b"])
events = st.one_of(
    st.builds(Submitted, _stage, _attempt, _task),
    st.builds(TaskProcessing, _stage, _attempt, _task),
    st.builds(TaskSucceeded, _stage, _attempt, _task, st.just(("u",))),
    st.builds(TaskFailed, _stage, _attempt, _task, st.just("e"), st.booleans()),
    st.just(CancelRequested()),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(events, max_size=30))
def test_random_histories_keep_invariants(history: list[Event]) -> None:
    """Whatever arrives, in any order or repeated: terminal stages never change, each stage
    succeeds at most once, run.* terminal events appear at most once."""
    p = pipeline(retry=2)
    state = started(p)
    succeeded: list[str] = []
    run_events: list[str] = []
    for event in history:
        before = state
        try:
            d = step(p, state, event)
        except InvalidTransitionError:
            continue
        for name, old in before.stages.items():
            if old.status.terminal:
                assert d.state.stages[name] == old
        succeeded += [
            c.stage or "" for c in d.commands if isinstance(c, Emit) and c.type == "stage.succeeded"
        ]
        run_events += [t for t in emits(d) if t.startswith("run.") and t != "run.started"]
        state = d.state
    assert len(succeeded) == len(set(succeeded))
    assert len(run_events) <= 1


def mirrored_run(p: specs.Pipeline) -> RunState:
    return step(p, initial_state("r1", p, mirror=True), Start()).state


def test_mirror_gates_success() -> None:
    """With mirroring, a completed task waits for its copy before the stage succeeds."""
    p = pipeline()
    s = step(p, mirrored_run(p), Submitted("image", 1, "t1")).state
    d = step(p, s, TaskSucceeded("image", 1, "t1", ("https://cdn/x.png",)))
    assert d.commands == (Mirror("image", 1),)
    assert d.state.stages["image"].status is StageStatus.PROCESSING
    d = step(p, d.state, Mirrored("image", 1, ("s3://b/runs/r1/image/0.png",)))
    image = d.state.stages["image"]
    assert image.status is StageStatus.SUCCEEDED and image.mirrored == (
        "s3://b/runs/r1/image/0.png",
    )
    assert image.outputs == ("https://cdn/x.png",)
    assert sorted(submits(d)) == [("mesh", 1), ("video", 1)] and emits(d) == ["stage.succeeded"]


def test_task_news_while_mirroring_is_stale() -> None:
    """Duplicates or a conflicting 'failed' during the copy change nothing."""
    p = pipeline()
    s = step(p, mirrored_run(p), TaskSucceeded("image", 1, "t1", ("u",))).state
    for event in (
        TaskSucceeded("image", 1, "t1", ("u",)),
        TaskFailed("image", 1, "t1", "late"),
        TaskProcessing("image", 1, "t1"),
    ):
        assert not step(p, s, event).changed


def test_mirror_failure_fails_stage() -> None:
    """An output that cannot be copied fails the stage and the run."""
    p = pipeline()
    s = step(p, mirrored_run(p), TaskSucceeded("image", 1, "t1", ("u",))).state
    d = step(p, s, MirrorFailed("image", 1, "host not allowed"))
    assert d.state.stages["image"].status is StageStatus.FAILED
    assert d.state.status is RunStatus.FAILED


def test_mirror_events_without_pending_copy_are_ignored() -> None:
    """Mirrored for a stage not awaiting a copy (duplicate job) changes nothing."""
    p = pipeline()
    s = step(p, mirrored_run(p), TaskSucceeded("image", 1, "t1", ("u",))).state
    done = step(p, s, Mirrored("image", 1, ("s3://b/k",))).state
    assert not step(p, done, Mirrored("image", 1, ("s3://b/k",))).changed
    assert not step(p, started(p), Mirrored("image", 1, ("s3://b/k",))).changed


def failed_video_run(p: specs.Pipeline) -> RunState:
    s = finish(p, started(p), "image").state
    s = step(p, s, Submitted("video", 1, "tv")).state
    s = step(p, s, Submitted("mesh", 1, "tm")).state
    s = step(p, s, TaskSucceeded("mesh", 1, "tm", ("u-mesh",))).state
    return step(p, s, TaskFailed("video", 1, "tv", "5000", retryable=False)).state


def test_retry_reruns_failed_and_downstream_reusing_upstream() -> None:
    """Retry without --from: the failed stage (attempt 2) and the cancelled downstream."""
    p = pipeline()
    s = failed_video_run(p)
    assert s.status is RunStatus.FAILED
    d = step(p, s, RetryRequested())
    assert submits(d) == [("video", 2)] and emits(d) == ["run.retried"]
    assert d.state.status is RunStatus.RUNNING
    assert d.state.stages["image"] == s.stages["image"]  # reused, not re-run
    assert d.state.stages["final"].status is StageStatus.PENDING
    d = finish(p, d.state, "video")
    assert submits(d) == [("final", 1)]
    assert finish(p, d.state, "final").state.status is RunStatus.SUCCEEDED


def test_retry_from_stage_reruns_downstream() -> None:
    """--from image re-runs image and everything after it, with fresh retry budgets."""
    p = pipeline(retry=2)
    s = failed_video_run(p)
    d = step(p, s, RetryRequested("image"))
    assert submits(d) == [("image", 2)]
    assert {n: st.attempt for n, st in d.state.stages.items()} == {
        "image": 2, "video": 1, "mesh": 1, "final": 0
    }  # fmt: skip
    d = finish(p, d.state, "image")
    assert sorted(submits(d)) == [("mesh", 2), ("video", 2)]
    s = step(p, d.state, Submitted("video", 2, "tv2")).state
    d = step(p, s, TaskFailed("video", 2, "tv2", "5000"))
    assert submits(d) == [("video", 3)]  # the budget restarted at the manual retry


def test_old_attempt_callback_after_retry_is_stale() -> None:
    """A late callback for the attempt before the retry changes nothing."""
    p = pipeline()
    d = step(p, failed_video_run(p), RetryRequested())
    assert not step(p, d.state, TaskSucceeded("video", 1, "tv", ("u",))).changed


@pytest.mark.parametrize("event", [RetryRequested(), RetryRequested("nope")])
def test_retry_refused_while_running_or_for_unknown_stage(event: RetryRequested) -> None:
    """A running run cannot be retried; an unknown stage is named."""
    p = pipeline()
    with pytest.raises(InvalidTransitionError):
        step(p, started(p) if event.from_stage is None else failed_video_run(p), event)


def test_a_cache_hit_succeeds_the_stage_without_a_task() -> None:
    """A cache hit succeeds a scheduled stage with the earlier outputs, marked cached, and
    schedules what depends on it; after a cancel it changes nothing."""
    p = pipeline()
    s = mirrored_run(p)
    d = step(p, s, CacheHit("image", 1, ("https://cdn/old.png",), ("s3://b/new/0.png",)))
    image = d.state.stages["image"]
    assert image.status is StageStatus.SUCCEEDED and image.cached
    assert image.mirrored == ("s3://b/new/0.png",) and image.task_id is None
    assert sorted(submits(d)) == [("mesh", 1), ("video", 1)]
    assert emits(d) == ["stage.succeeded"]
    cancelled = step(p, s, CancelRequested()).state
    assert not step(p, cancelled, CacheHit("image", 1, ("u",), ("s3://b/x",))).changed
