"""`wavechain serve --processes N`: N serving processes share one port (SO_REUSEPORT, the
kernel spreads connections between them), so one pod uses all its cores.

The supervisor starts them, passes SIGTERM and SIGINT on, and waits. If one dies on its
own, the others are stopped and the supervisor exits non-zero: the orchestrator then
restarts the pod whole, rather than running on with a part of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from types import FrameType

import structlog

log = structlog.get_logger("wavechain.cli")


def supervise(child_args: Sequence[str], processes: int, env: Mapping[str, str]) -> int:
    """Run ``processes`` copies of ``wavechain <child_args>``; the exit code is 0 when
    every one stopped cleanly after a signal, else the first failure's. The processes
    count their metrics in one shared directory (prometheus-client's multiprocess mode),
    so that whichever answers /metrics answers for all of them."""
    shared = env.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="wavechain-metrics-")
    env = {**env, "PROMETHEUS_MULTIPROC_DIR": shared}
    try:
        return _supervise(child_args, processes, env)
    finally:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            shutil.rmtree(shared, ignore_errors=True)


def _supervise(child_args: Sequence[str], processes: int, env: Mapping[str, str]) -> int:
    children = [
        subprocess.Popen(  # noqa: S603 - our own entry point and arguments
            [sys.executable, "-m", "service.cli", *child_args],
            env={**env, "WAVECHAIN_PROCESS": str(n)},
        )
        for n in range(processes)
    ]
    log.info("service.processes", processes=processes, pids=[c.pid for c in children])
    stopping = False

    def forward(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while any(c.poll() is None for c in children):
        for child in children:
            status = child.poll()
            if status is not None and status != 0 and not stopping:
                log.error("service.process_died", pid=child.pid, code=status)
                code = code or status
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    for child in children:
        if child.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
            code = code or child.returncode or 1
    return code if code >= 0 else 1


def child_arguments(argv: Sequence[str]) -> list[str]:
    """The command line of one serving process: ``argv`` without ``--processes N``, with
    ``--reuse-port``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return [*out, "--reuse-port"]


def process_index() -> int:
    return int(os.environ.get("WAVECHAIN_PROCESS", "0"))
