"""Cancellation that reaches the provider (issue 25 §4), over real processes: a `serve`
and the emulator. A cancel, a run's deadline and a failed fan-in sibling delete the
tasks still running at the emulator; a delete the emulator refuses (503) is retried; the
late callback of a deleted task is recorded and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.procs import Stack, stack

pytestmark = pytest.mark.e2e

SECRET = "whsec_Y2FuY2VsbGF0aW9uLXRlc3Qtc2VjcmV0"
IMG, I2V = "wavespeed-ai/hunyuan-image-2.1", "wavespeed-ai/hunyuan-video/i2v"


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Stack]:
    """A serve and an emulator whose tasks take 6 s; reconciliation every second."""
    with stack(tmp_path, SECRET, {"RECONCILE_INTERVAL_S": "1"}, latency=6.0) as urls:
        yield urls


def _until(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _tasks(urls: Stack) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = requests.get(f"{urls.emulator}/_emulator/tasks", timeout=5).json()
    return tasks


def _counters(urls: Stack) -> dict[str, int]:
    counters: dict[str, int] = requests.get(f"{urls.emulator}/_emulator/stats", timeout=5).json()[
        "counters"
    ]
    return counters


def _start(urls: Stack, body: dict[str, Any]) -> str:
    r = requests.post(f"{urls.api}/v1/runs", json=body, timeout=10)
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def _run(urls: Stack, run_id: str) -> dict[str, Any]:
    run: dict[str, Any] = requests.get(f"{urls.api}/v1/runs/{run_id}", timeout=5).json()
    return run


def _running_task(urls: Stack, model: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next(
            (t for t in _tasks(urls) if t["model"] == model and t["status"] == "processing"),
            None,
        )

    task: dict[str, Any] = _until(f"a {model} task running at the emulator", find)
    return task


def _status_at_emulator(urls: Stack, task_id: str) -> str:
    status: str = next(t["status"] for t in _tasks(urls) if t["id"] == task_id)
    return status


def test_cancel_deletes_the_running_task_and_its_late_callback_changes_nothing(
    slow: Stack,
) -> None:
    run_id = _start(slow, {"pipeline": "image_video_3d"})
    task = _running_task(slow, IMG)
    r = requests.post(f"{slow.api}/v1/runs/{run_id}/cancel", timeout=10)
    assert r.status_code == 200, r.text
    _until("the task deleted", lambda: _status_at_emulator(slow, task["id"]) == "deleted")
    answer = requests.get(
        f"{slow.emulator}/api/v3/predictions/{task['id']}/result",
        headers={"Authorization": "Bearer any"},
        timeout=5,
    )
    assert answer.json()["data"]["status"] == "deleted"  # later polls report it
    # The deleted task's callback (status "deleted") is recorded and changes nothing.
    deliveries = _until(
        "the late callback",
        lambda: requests.get(f"{slow.api}/v1/runs/{run_id}/deliveries", timeout=5).json()[
            "deliveries"
        ],
    )
    assert [(d["status"], d["effect"]) for d in deliveries] == [("deleted", "no_effect")]
    run = _run(slow, run_id)
    assert run["status"] == "cancelled"
    assert {s["name"]: s["status"] for s in run["stages"]} == {
        "image": "cancelled", "video": "cancelled", "mesh": "cancelled"
    }  # fmt: skip
    counters = _counters(slow)
    assert counters["submits"] == 1  # nothing downstream was bought
    assert counters["tasks_deleted_running"] == 1


def test_a_refused_delete_is_retried_until_it_is_done(slow: Stack) -> None:
    requests.put(
        f"{slow.emulator}/_emulator/faults", json={"delete_error_rate": 1.0}, timeout=5
    ).raise_for_status()
    run_id = _start(slow, {"pipeline": "image_video_3d"})
    task = _running_task(slow, IMG)
    requests.post(f"{slow.api}/v1/runs/{run_id}/cancel", timeout=10).raise_for_status()
    _until("two refused deletes", lambda: _counters(slow).get("deletes_refused", 0) >= 2)
    assert _status_at_emulator(slow, task["id"]) == "processing"
    requests.put(
        f"{slow.emulator}/_emulator/faults", json={"delete_error_rate": 0.0}, timeout=5
    ).raise_for_status()
    _until("the task deleted", lambda: _status_at_emulator(slow, task["id"]) == "deleted")


def test_a_run_past_its_deadline_is_cancelled_and_its_task_deleted(slow: Stack) -> None:
    for deadline, why in [
        ("2020-01-01T00:00:00Z", "has passed already"),
        ("2030-01-01T00:00:00", "needs its offset"),
        ("tomorrow", "is not an ISO 8601 time"),
        (0, "must be seconds in range"),
    ]:
        body: dict[str, Any] = {"pipeline": "image_video_3d", "deadline": deadline}
        r = requests.post(f"{slow.api}/v1/runs", json=body, timeout=10)
        assert r.status_code == 400 and why in r.text and "deadline" in r.text, r.text
    run_id = _start(slow, {"pipeline": "image_video_3d", "deadline": 2})
    task = _running_task(slow, IMG)
    _until("the run cancelled", lambda: _run(slow, run_id)["status"] == "cancelled")
    _until("the task deleted", lambda: _status_at_emulator(slow, task["id"]) == "deleted")
    events = requests.get(f"{slow.api}/v1/runs/{run_id}/events", timeout=5).json()["events"]
    cancelled = [e for e in events if e["type"] == "run.cancelled"]
    assert len(cancelled) == 1 and "run deadline passed" in cancelled[0]["error"]


def test_a_failed_fan_in_sibling_deletes_the_other_branch(slow: Stack) -> None:
    """b fails fast (its input image cannot be fetched: task error 1402); a, still
    running, is deleted; the fan-in c is never submitted."""
    missing = f"{slow.emulator}/media/outputs/nothing-here/0.png"
    spec = {
        "inputs": {"picture": "string"},
        "stages": {
            "a": {"model": IMG, "input": {"prompt": "a kite"}},
            "b": {"model": I2V, "input": {"image": "${inputs.picture}", "prompt": "x"}},
            "c": {"model": I2V, "input": {"image": "${stages.a.outputs[0]}"}, "needs": ["b"]},
        },
    }
    run_id = _start(slow, {"pipeline": spec, "inputs": {"picture": missing}})
    _until("the run failed", lambda: _run(slow, run_id)["status"] == "failed")
    task = next(t for t in _tasks(slow) if t["model"] == IMG)
    _until("a's task deleted", lambda: _status_at_emulator(slow, task["id"]) == "deleted")
    run = _run(slow, run_id)
    stages = {s["name"]: s for s in run["stages"]}
    assert stages["b"]["status"] == "failed" and "1402" in stages["b"]["error"]
    assert stages["a"]["status"] == "cancelled" and stages["c"]["status"] == "cancelled"
    assert _counters(slow)["submits"] == 2
    assert _counters(slow)["tasks_deleted_running"] == 1
