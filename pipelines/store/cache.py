"""Parsed specs and run states kept in memory, shared by both backends.

A run's state is cached with the version it was read or written at: every change to a
run goes through a transition that bumps the version, so a matching version read in the
same transaction means an unchanged state, and saves reading and decoding every stage.

Specs are parsed off the store's write path (``load`` is called before an operation, or
after one that raised ``NeedPipeline``), so a large spec never stalls other commits.
The spec cache is bounded by count and by the size of the specs it stands for.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from pipelines import spec as specs
from pipelines.state import RunState

#: Stored specs were accepted under the limits of their day: read them back with room.
STORED_LIMITS = specs.Limits(max_stages=100_000, max_spec_bytes=1 << 40, max_depth=10_000)


class NeedPipeline(Exception):
    """An operation needs a run's parsed spec that is not cached: load it and run again."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


def parse_stored(run_id: str, text: str) -> specs.Pipeline:
    return specs.parse(json.loads(text), where=f"run {run_id}", limits=STORED_LIMITS)


class RunCache:
    def __init__(self, *, max_runs: int, max_spec_bytes: int) -> None:
        self._max_runs = max_runs
        self._max_bytes = max_spec_bytes
        # Written by the event loop's thread only; read from the SQLite writer thread too
        # (single dict operations are atomic).
        self._pipelines: dict[str, tuple[specs.Pipeline, int]] = {}
        self._bytes = 0
        # Each run's state as of its version; touched by one thread only (the SQLite
        # writer, or the loop for PostgreSQL).
        self._states: OrderedDict[str, tuple[int, RunState]] = OrderedDict()

    def pipeline(self, run_id: str) -> specs.Pipeline | None:
        cached = self._pipelines.get(run_id)
        return None if cached is None else cached[0]

    def pipeline_or_raise(self, run_id: str) -> specs.Pipeline:
        cached = self._pipelines.get(run_id)
        if cached is None:
            raise NeedPipeline(run_id)
        return cached[0]

    def add_pipeline(self, run_id: str, pipeline: specs.Pipeline, size: int) -> None:
        """Cache a parsed spec (``size``: its JSON's length); the oldest go first."""
        if run_id in self._pipelines:
            return
        self._pipelines[run_id] = (pipeline, size)
        self._bytes += size
        while len(self._pipelines) > 1 and (
            len(self._pipelines) > self._max_runs or self._bytes > self._max_bytes
        ):
            oldest = next(iter(self._pipelines))
            self._bytes -= self._pipelines.pop(oldest)[1]

    def state(self, run_id: str, version: int) -> RunState | None:
        cached = self._states.get(run_id)
        if cached is None or cached[0] != version:
            return None
        self._states.move_to_end(run_id)
        return cached[1]

    def remember(self, state: RunState, version: int) -> None:
        self._states[state.run_id] = (version, state)
        self._states.move_to_end(state.run_id)
        while len(self._states) > self._max_runs:
            self._states.popitem(last=False)

    def forget_states(self) -> None:
        """After a rollback: what the rolled-back work cached may never have been."""
        self._states.clear()
