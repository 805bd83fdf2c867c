"""Compare two versions of the receiver, for changes smaller than this machine's noise.

Not part of `make bench`: a tool for judging a change to the webhook path before
committing it. A TARGET is a source tree (a checkout or `git worktree add` of the code
to run as `wavechain serve`), optionally with ``@LEVEL`` (the log level, INFO by
default), or a baseline: ``verify`` (verify only) or ``record`` (verify, then a
group-committed SQLite insert: the hand-rolled receiver).

    python -m tests.bench.ab together A B [REPS] [SECONDS]
        Both targets under load at the same time, from one wrk process each, so that
        both see the same machine: B's throughput and CPU per delivery over A's, per
        repetition. Sequential A/B runs here swing by 30% within minutes.
    python -m tests.bench.ab instructions TARGET [DELIVERIES] [KEEP_DIR]
        Instructions per delivery (valgrind callgrind), per thread: repeatable within
        0.3% between runs, whatever else the machine does. Slow (about 40 s for 2,000).
        With KEEP_DIR, callgrind's files are copied there (`callgrind_annotate FILE`).
    python -m tests.bench.ab instructions-all [DELIVERIES]
        ``instructions`` for verify-only, the hand-rolled receiver and this tree at
        WARNING and at INFO, written to tests/bench/instructions.json with the date,
        machine and commit; RESULTS.md's receiver section quotes that file. About 1.5 min.
    python -m tests.bench.ab pinned TARGET [REPS] [SECONDS]
        TARGET and the verify-only baseline, each run with no CPU affinity and with the
        target on one CPU and wrk on another (taskset), in rotating order: how much of the
        gap to verify-only is the target's threads sharing cores with the load generator.
    python -m tests.bench.ab syscalls TARGET [SECONDS]
        System calls per delivery, every thread of TARGET under wrk load (strace -c; strace
        slows the target, so read the counts, not the times).

Needs wrk (``together``, ``pinned``, ``syscalls``), valgrind (``instructions``), taskset
(``pinned``) and strace (``syscalls``); `make bench` installs wrk, valgrind is on the
machine, strace is Debian's package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench import benches
from tests.bench.baseline_server import MODES as BASELINES
from tests.support.procs import free_port, running, serve_env


def _command(tree: str, level: str, port: int, db: Path) -> list[str]:
    if tree in BASELINES:
        return benches.baseline_command(port, tree, db if tree == "record" else None)
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
    tree = tree if tree in BASELINES else str(Path(tree).resolve())
    port = free_port()
    db = work / f"{name}.db"
    env = serve_env(emu, port, db, benches.SECRET)
    with running([*(wrapper or []), *_command(tree, level or "INFO", port, db)], port,
                 work / f"{name}.log", env) as proc:  # fmt: skip
        yield f"http://127.0.0.1:{port}", proc.pid


@contextlib.contextmanager
def _workspace(prefix: str) -> Iterator[tuple[contextlib.ExitStack, Path, str]]:
    """A scratch folder and an emulator that sends no webhooks (wrk sends the deliveries);
    yields the stack that later targets join, the folder and the emulator's URL."""
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        emu, emu_ctx = benches.emulator(work, "drop_rate=1")
        stack.enter_context(emu_ctx)
        yield stack, work, emu


def _one_target(
    stack: contextlib.ExitStack, spec: str, emu: str, work: Path, wrapper: list[str] | None = None
) -> tuple[str, int, str, list[dict[str, Any]]]:
    """Start ``spec``: (its URL, its pid, the wavechain whose tasks the deliveries name, those
    tasks). For a baseline, a wavechain of this tree runs beside it for the tasks."""
    seed = None
    if spec.partition("@")[0] in BASELINES:
        seed, _ = stack.enter_context(_target(str(Path.cwd()), "seed", emu, work))
    url, pid = stack.enter_context(_target(spec, "target", emu, work, wrapper))
    api = seed or url
    return url, pid, api, benches.completed_tasks(emu, [api], 100)[api]


def _to(url: str, api: str) -> str | None:
    """Where deliveries naming the tasks of ``api`` go to reach ``url``: their own webhook
    URLs if ``url`` is that wavechain, else the same paths on ``url``."""
    return None if url == api else url


def _raw(tasks: list[dict[str, Any]], count: int, offset: int, path: Path, url: str,
         api: str) -> Path:  # fmt: skip
    """wrk's raw requests, on disk before any load starts."""
    raw = benches._deliveries(tasks, count, offset, path, to=_to(url, api), raw=True)
    os.sync()  # as in `make bench`: the files' writeback would stall the fsyncs
    return raw


def _cpu_us(pid: int, before: float, result: dict[str, Any]) -> float:
    """CPU µs per delivery of ``pid`` since ``before`` (its cpu_seconds), over wrk's count."""
    return float((benches.cpu_seconds(pid) - before) / max(result["requests"], 1) * 1e6)


def together(a: str, b: str, reps: int = 5, seconds: int = 6) -> dict[str, Any]:
    """Prints each repetition and returns the medians: B's deliveries/s over A's and B's
    CPU per delivery over A's, with every repetition's ratio and each side's rate."""
    with _workspace("wavechain-ab-") as (stack, work, emu):
        targets = {
            n: stack.enter_context(_target(s, n, emu, work)) for n, s in (("A", a), ("B", b))
        }
        seeded = [
            url
            for (url, _), spec in zip(targets.values(), (a, b), strict=True)
            if spec not in BASELINES
        ]
        if not seeded:
            sys.exit("at least one target must be a wavechain tree")
        tasks = benches.completed_tasks(emu, seeded, 100)
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        rates: dict[str, list[float]] = {"A": [], "B": []}
        for rep in range(reps):
            raw, procs, before = {}, {}, {}
            for i, (name, (url, _pid)) in enumerate(targets.items()):
                api = url if url in tasks else seeded[0]
                path = work / f"deliveries-{name}.jsonl"
                raw[name] = _raw(tasks[api], 100_000, (rep * 2 + i) * 100_000, path, url, api)
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
                cpu[name] = _cpu_us(targets[name][1], before[name], result)
            ratios.append(rps["B"] / rps["A"])
            cpu_ratios.append(cpu["B"] / cpu["A"])
            rates["A"].append(rps["A"])
            rates["B"].append(rps["B"])
            print(f"rep {rep}: A {rps['A']:,.0f}/s {cpu['A']:.0f} µs  B {rps['B']:,.0f}/s "
                  f"{cpu['B']:.0f} µs  B/A {ratios[-1]:.3f}", flush=True)  # fmt: skip
        print(f"B/A deliveries/s: median {statistics.median(ratios):.3f} "
              f"{[round(r, 3) for r in ratios]}; CPU per delivery: median "
              f"{statistics.median(cpu_ratios):.3f}")  # fmt: skip
        return {
            "ratio_median": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
            "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
            "a_rps_median": round(statistics.median(rates["A"])),
            "b_rps_median": round(statistics.median(rates["B"])),
        }


#: Deliveries measured per target by ``instructions`` (after 1,000 to warm up).
DELIVERIES = 2000


def instructions(spec: str, count: int = DELIVERIES, keep: str | None = None) -> dict[str, float]:
    """Prints and returns thousands of instructions per delivery: ``loop`` (the main
    thread, which runs the event loop) and ``other_threads`` (the SQLite writer, if any)."""
    with _workspace("wavechain-ir-") as (stack, work, emu):
        out = work / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    "--separate-threads=yes", f"--callgrind-out-file={out}"]  # fmt: skip
        url, pid, api, tasks = _one_target(stack, spec, emu, work, valgrind)

        def send(n: int, offset: int) -> None:
            path = work / f"d{offset}.jsonl"
            benches._deliveries(tasks, n, offset, path, to=_to(url, api))
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
        per_delivery = {"loop": 0.0, "other_threads": 0.0}
        for dump in sorted(work.glob("callgrind.out.*")):
            text = dump.read_text(errors="replace")
            found = re.search(r"^totals:\s*(\d+)", text, re.M)
            thread = re.search(r"^thread:\s*(\d+)", text, re.M)
            if found and int(found[1]):
                main = thread is not None and thread[1] == "1"
                label = "main (event loop)" if main else f"thread {thread and thread[1]}"
                k = int(found[1]) / count / 1000
                per_delivery["loop" if main else "other_threads"] += k
                print(f"{label}: {k:.1f} k instructions per delivery")
        total = sum(per_delivery.values())
        print(f"total: {total:.1f} k instructions per delivery")
        if keep:  # for callgrind_annotate: which functions the instructions are in
            Path(keep).mkdir(parents=True, exist_ok=True)
            for dump in work.glob("callgrind.out.*"):
                shutil.copy(dump, keep)
        return {part: round(k, 1) for part, k in per_delivery.items()}


#: What ``instructions-all`` measures, under the names RESULTS.md's receiver section uses.
INSTRUCTION_TARGETS = {
    "verify": "verify",
    "record": "record",
    "wavechain_quiet": ".@WARNING",
    "wavechain": ".@INFO",
}


def instructions_all(count: int = DELIVERIES) -> None:
    """Every receiver target's instructions per delivery, into instructions.json."""
    if not Path("service").is_dir():
        sys.exit("run from the project's root: the tree measured is the current folder")
    figures = {name: instructions(spec, count) for name, spec in INSTRUCTION_TARGETS.items()}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    # The product's code decides the figures; a changed harness or README does not.
    changed = git("status", "--porcelain", "--", "service", "pipelines")
    meta = {
        "machine": benches.machine(),
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "commit": commit + (" with uncommitted changes" if changed else ""),
        "deliveries": count,
    }
    out = benches.INSTRUCTIONS
    out.write_text(json.dumps({"meta": meta, "k_per_delivery": figures}, indent=1) + "\n")
    print(f"written: {out}")


def _affinity(pid: int, cpus: str) -> None:
    """Every thread of ``pid`` (the writer too) on ``cpus``."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True)


def _fire(url: str, pid: int, raw: Path, seconds: int, wrk_cpu: str | None) -> tuple[float, float]:
    """(deliveries/s, CPU µs per delivery) of one wrk run at ``url``."""
    before = benches.cpu_seconds(pid)
    command = benches.wrk_command(url, raw, seconds)
    if wrk_cpu is not None:
        command = ["taskset", "-c", wrk_cpu, *command]
    result = benches.wrk_result(subprocess.run(command, capture_output=True, text=True).stdout)
    return result["rps"], _cpu_us(pid, before, result)


def pinned(spec: str, reps: int = 6, seconds: int = 4) -> None:
    if spec.partition("@")[0] in BASELINES:
        sys.exit("TARGET is a wavechain tree; verify runs beside it")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("needs two CPUs: one for the target, one for wrk")
    everywhere, server_cpu, wrk_cpu = ",".join(map(str, cpus)), str(cpus[0]), str(cpus[1])
    with _workspace("wavechain-pin-") as (stack, work, emu):
        targets = {n: stack.enter_context(_target(s, n, emu, work)) for n, s in
                   (("target", spec), ("verify", "verify"))}  # fmt: skip
        api = targets["target"][0]
        tasks = benches.completed_tasks(emu, [api], 100)[api]
        runs = [(name, pin) for name in targets for pin in (False, True)]
        rows: list[dict[tuple[str, bool], float]] = []
        for rep in range(reps):
            rps: dict[tuple[str, bool], float] = {}
            cells = []
            for i in range(len(runs)):  # rotating order: no setting always goes first
                name, pin = runs[(rep + i) % len(runs)]
                url, pid = targets[name]
                offset = (rep * len(runs) + i + 1) * 100_000
                raw = _raw(tasks, 60_000, offset, work / "deliveries.jsonl", url, api)
                _affinity(pid, server_cpu if pin else everywhere)
                rps[(name, pin)], cpu = _fire(url, pid, raw, seconds, wrk_cpu if pin else None)
                cells.append(f"{name}{' pinned' if pin else ''} {rps[(name, pin)]:,.0f}/s "
                             f"{cpu:.0f} µs")  # fmt: skip
            rows.append(rps)
            print(f"rep {rep}: " + " | ".join(cells), flush=True)

        def median(a: tuple[str, bool], b: tuple[str, bool]) -> str:
            values = [r[a] / r[b] for r in rows]
            return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

        for label, (a, b) in {
            "target pinned/unpinned": (("target", True), ("target", False)),
            "verify pinned/unpinned": (("verify", True), ("verify", False)),
            "target/verify unpinned": (("target", False), ("verify", False)),
            "target/verify pinned": (("target", True), ("verify", True)),
        }.items():
            print(f"{label}: {median(a, b)}")


def syscalls(spec: str, seconds: int = 5) -> None:
    with _workspace("wavechain-sys-") as (stack, work, emu):
        url, pid, api, tasks = _one_target(stack, spec, emu, work)
        raw = _raw(tasks, 100_000, 10**6, work / "deliveries.jsonl", url, api)
        threads = [a for t in sorted(Path(f"/proc/{pid}/task").iterdir()) for a in ("-p", t.name)]
        report = work / "strace.txt"
        tracer = subprocess.Popen(["strace", "-c", "-o", str(report), *threads],
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1)  # attached to every thread before the load starts
        load = subprocess.run(
            benches.wrk_command(url, raw, seconds), capture_output=True, text=True
        )
        result = benches.wrk_result(load.stdout)
        tracer.send_signal(signal.SIGINT)
        tracer.wait()
        count = max(result["requests"], 1)
        print(f"{spec}: {count:,} deliveries under strace; system calls per delivery:")
        for line in report.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
                print(f"  {fields[-1]:<16} {int(fields[3]) / count:6.2f}")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "together":
        together(sys.argv[2], sys.argv[3], *(int(x) for x in sys.argv[4:6]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "instructions-all":
        instructions_all(*(int(x) for x in sys.argv[2:3]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "instructions":
        count = int(sys.argv[3]) if len(sys.argv) > 3 else DELIVERIES
        instructions(sys.argv[2], count, sys.argv[4] if len(sys.argv) > 4 else None)
    elif len(sys.argv) >= 3 and sys.argv[1] == "pinned":
        pinned(sys.argv[2], *(int(x) for x in sys.argv[3:5]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "syscalls":
        syscalls(sys.argv[2], *(int(x) for x in sys.argv[3:4]))
    else:
        sys.exit(__doc__)
