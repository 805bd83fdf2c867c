"""Health of the long-running loops (workers, sweeper, relay, retention), for the probes.

Each loop reports after every iteration: None when it went well, the error when it
failed (the loop itself logs, backs off and goes on). From the reports:

- ready: no loop's last iteration failed and none has gone silent. Readiness turns red
  while the database is locked or down, so the ingress and the orchestrator see it.
- live: no loop has been failing, or silent, for longer than ``dead_after_s``: a pod
  whose loops cannot run is restarted.

A loop is silent when it has not reported for ten of its intervals (at least 30 s), or
when its task ended; it is stalled when an iteration it began (``begin``) has been
waiting longer than ``stall_s`` (a database whose lock another process holds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class _Loop:
    interval_s: float
    last_report: float
    failing_since: float | None = None
    error: str = ""
    ended: bool = False
    began: float | None = None


class Reporter:
    """What a loop calls: ``begin()`` as a wait on the store starts (optional), and
    ``report(error)`` (or the reporter itself) after each iteration."""

    def __init__(self, loops: Loops | None = None, name: str = "") -> None:
        self._loops = loops
        self._name = name

    def begin(self) -> None:
        if self._loops is not None:
            self._loops.begin(self._name)

    def __call__(self, error: BaseException | None) -> None:
        if self._loops is not None:
            self._loops.report(self._name, error)


NO_REPORTS = Reporter()


@dataclass(frozen=True, slots=True)
class LoopsStatus:
    ready: bool
    live: bool
    #: name → what is wrong with it, for the probes' bodies and the logs.
    problems: dict[str, str] = field(default_factory=dict)


class Loops:
    def __init__(
        self,
        *,
        dead_after_s: float = 120.0,
        stall_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loops: dict[str, _Loop] = {}
        self._dead_after_s = dead_after_s
        self._stall_s = stall_s
        self._clock = clock

    def register(self, name: str, *, interval_s: float) -> Reporter:
        """The reporter ``name`` calls after each iteration."""
        self._loops[name] = _Loop(interval_s, self._clock())
        return Reporter(self, name)

    def begin(self, name: str) -> None:
        self._loops[name].began = self._clock()

    def report(self, name: str, error: BaseException | None) -> None:
        loop = self._loops[name]
        now = self._clock()
        loop.last_report = now
        loop.began = None
        if error is None:
            loop.failing_since, loop.error = None, ""
        else:
            if loop.failing_since is None:
                loop.failing_since = now
            loop.error = f"{type(error).__name__}: {error}"[:300]

    def ended(self, name: str, error: BaseException | None) -> None:
        """The loop's task ended: it runs no more."""
        loop = self._loops[name]
        loop.ended = True
        loop.error = "ended" if error is None else f"ended: {type(error).__name__}: {error}"[:300]
        loop.failing_since = loop.failing_since or self._clock()

    def status(self) -> LoopsStatus:
        now = self._clock()
        ready, live = True, True
        problems: dict[str, str] = {}
        for name, loop in self._loops.items():
            silent_for = now - loop.last_report
            silent = silent_for > max(30.0, 10 * loop.interval_s)
            since = loop.failing_since
            if loop.ended or since is not None:
                ready = False
                problems[name] = loop.error
                if loop.ended or (since is not None and now - since > self._dead_after_s):
                    live = False
            elif loop.began is not None and now - loop.began > self._stall_s:
                ready = False
                problems[name] = f"waiting on the store for {now - loop.began:.1f} s"
                if now - loop.began > self._dead_after_s:
                    live = False
            elif silent:
                ready = False
                problems[name] = f"no iteration for {silent_for:.0f} s"
                if silent_for > self._dead_after_s:
                    live = False
        return LoopsStatus(ready, live, problems)

    def as_json(self) -> dict[str, Any]:
        status = self.status()
        return {"ready": status.ready, "live": status.live, "loops": status.problems}
