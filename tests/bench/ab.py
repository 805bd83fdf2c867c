"""Compare two versions of the receiver, for changes smaller than this machine's noise.

Not part of `make bench`: a tool for judging a change to the webhook path before
committing it. A TARGET is a source tree (a checkout or `git worktree add` of the code
to run as `wavechain serve`), optionally with ``@LEVEL`` (the log level, INFO by
default), or ``verify`` (the verify-only baseline).

    python -m tests.bench.ab together A B [REPS] [SECONDS]
        Both targets under load at the same time, from one wrk process each, so that
        both see the same machine: B's throughput and CPU per delivery over A's, per
        repetition. Sequential A/B runs here swing by 30% within minutes.
    python -m tests.bench.ab instructions TARGET [DELIVERIES]
        Instructions per delivery (valgrind callgrind), per thread: repeatable within
        0.3% between runs, whatever else the machine does. Slow (about 40 s for 2,000).

Needs wrk (``together``) or valgrind (``instructions``), as `make bench` installs them.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.bench import benches
from tests.support.procs import free_port, running, serve_env


def _command(tree: str, level: str, port: int) -> list[str]:
    if tree == "verify":
        return [benches.PY, "-m", "tests.bench.baseline_server", str(port), "verify",
                benches.SECRET]  # fmt: skip
    # The tree's own code, whatever is installed or on the current path.
    code = (
        f"import sys, runpy; sys.path.insert(0, {tree!r}); sys.argv[0] = 'wavechain'; "
        "runpy.run_module('service.cli', run_name='__main__')"
    )
    return [benches.PY, "-c", code, "--log-json", "--log-level", level, "serve"]


@contextlib.contextmanager
def _target(
    spec: str, name: str, emu: str, work: Path, wrapper: list[str] | None = None
) -> Iterator[tuple[str, int]]:
    """Start ``spec``; yield its base URL and process id."""
    tree, _, level = spec.partition("@")
    tree = tree if tree == "verify" else str(Path(tree).resolve())
    port = free_port()
    db = work / f"{name}.db"
    env = serve_env(emu, port, db, benches.SECRET)
    with running([*(wrapper or []), *_command(tree, level or "INFO", port)], port,
                 work / f"{name}.log", env) as proc:  # fmt: skip
        yield f"http://127.0.0.1:{port}", proc.pid


def together(a: str, b: str, reps: int = 5, seconds: int = 6) -> None:
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wavechain-ab-")))
        emu, emu_ctx = benches.emulator(work, "drop_rate=1")
        stack.enter_context(emu_ctx)
        targets = {
            n: stack.enter_context(_target(s, n, emu, work)) for n, s in (("A", a), ("B", b))
        }
        seeded = [
            url for (url, _), spec in zip(targets.values(), (a, b), strict=True) if spec != "verify"
        ]
        assert seeded, "at least one target must be a wavechain tree"
        tasks = benches.completed_tasks(emu, seeded, 100)
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        for rep in range(reps):
            raw, procs, before = {}, {}, {}
            for i, (name, (url, _pid)) in enumerate(targets.items()):
                api = url if url in tasks else seeded[0]
                path = work / f"deliveries-{name}.jsonl"
                offset = (rep * 2 + i) * 100_000
                to = None if url == api else url
                raw[name] = benches._raw_requests(
                    benches._deliveries(tasks[api], 100_000, offset, path, to=to)
                )
            os.sync()  # as in `make bench`: the files' writeback would stall the fsyncs
            order = list(targets) if rep % 2 == 0 else list(targets)[::-1]
            for name in order:
                url, pid = targets[name]
                before[name] = benches.cpu_seconds(pid)
                command = benches.wrk_command(url, raw[name], seconds)
                procs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            rps, cpu = {}, {}
            for name, proc in procs.items():
                result = benches.wrk_result(proc.communicate()[0])
                rps[name] = result["rps"]
                spent = benches.cpu_seconds(targets[name][1]) - before[name]
                cpu[name] = spent / max(result["requests"], 1) * 1e6
            ratios.append(rps["B"] / rps["A"])
            cpu_ratios.append(cpu["B"] / cpu["A"])
            print(f"rep {rep}: A {rps['A']:,.0f}/s {cpu['A']:.0f} µs  B {rps['B']:,.0f}/s "
                  f"{cpu['B']:.0f} µs  B/A {ratios[-1]:.3f}", flush=True)  # fmt: skip
        print(f"B/A deliveries/s: median {statistics.median(ratios):.3f} "
              f"{[round(r, 3) for r in ratios]}; CPU per delivery: median "
              f"{statistics.median(cpu_ratios):.3f}")  # fmt: skip


def instructions(spec: str, count: int = 2000) -> None:
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wavechain-ir-")))
        out = work / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    "--separate-threads=yes", f"--callgrind-out-file={out}"]  # fmt: skip
        emu, emu_ctx = benches.emulator(work, "drop_rate=1")
        stack.enter_context(emu_ctx)
        if spec.partition("@")[0] == "verify":  # deliveries need tasks a wavechain knows
            seed_url, _ = stack.enter_context(_target(str(Path.cwd()), "seed", emu, work))
        url, pid = stack.enter_context(_target(spec, "target", emu, work, valgrind))
        api = url if spec.partition("@")[0] != "verify" else seed_url
        tasks = benches.completed_tasks(emu, [api], 100)[api]

        def send(n: int, offset: int) -> None:
            to = None if url == api else url
            path = benches._deliveries(tasks, n, offset, work / f"d{offset}.jsonl", to=to)
            subprocess.run([benches.PY, "-m", "tests.bench.loadgen", str(path), "600", "64"],
                           check=True, capture_output=True)  # fmt: skip

        send(1000, 0)  # warm: caches, statement cache, first-time imports
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
        send(count, 10**6)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True
        )
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
        time.sleep(1)
        total = 0
        for dump in sorted(work.glob("callgrind.out.*")):
            text = dump.read_text(errors="replace")
            found = re.search(r"^totals:\s*(\d+)", text, re.M)
            thread = re.search(r"^thread:\s*(\d+)", text, re.M)
            if found and int(found[1]):
                total += int(found[1])
                label = (
                    "main (event loop)"
                    if thread and thread[1] == "1"
                    else f"thread {thread and thread[1]}"
                )
                print(f"{label}: {int(found[1]) / count / 1000:.1f} k instructions per delivery")
        print(f"total: {total / count / 1000:.1f} k instructions per delivery")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "together":
        together(sys.argv[2], sys.argv[3], *(int(x) for x in sys.argv[4:6]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "instructions":
        instructions(sys.argv[2], *(int(x) for x in sys.argv[3:4]))
    else:
        sys.exit(__doc__)
