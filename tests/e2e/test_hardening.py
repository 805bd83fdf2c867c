"""Faults against `wavechain serve` as a process: a database locked past the busy timeout,
slow clients, and shutdown within the pod's grace period."""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import requests

from tests.support.procs import free_port, serve_env, wavechain

SECRET = "whsec_aGFyZGVuaW5nLXRlc3Q="


def test_a_locked_database_turns_readiness_red_and_work_resumes_after(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock for 8 s (past the 5 s busy timeout) while
    runs are in flight: readiness says so while it lasts, the workers keep trying, and
    after the lock is released every run completes, each stage submitted once."""
    emu_port, port = free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    db = tmp_path / "state.db"
    env = serve_env(emu, port, db, SECRET, CALLBACK_TIMEOUT_S="2", RECONCILE_INTERVAL_S="1")
    api = f"http://127.0.0.1:{port}"
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", "0.5", "--webhook-secret",
                  SECRET, "--fault", "webhook_retries=10", "--fault", "webhook_backoff_s=1",
                  port=emu_port, log=tmp_path / "emu.log"),
        wavechain("--log-json", "serve", port=port, log=tmp_path / "serve.log", env=env),
    ):  # fmt: skip
        ids = [
            requests.post(f"{api}/v1/runs", json={"pipeline": "image_video_3d"}, timeout=10).json()[
                "id"
            ]
            for _ in range(4)
        ]
        holder = sqlite3.connect(db, isolation_level=None, timeout=30)
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        readiness: list[int] = []
        said: dict[str, str] = {}
        while time.monotonic() - started < 8:
            answer = requests.get(f"{api}/readyz", timeout=10)
            readiness.append(answer.status_code)
            said |= answer.json()["loops"]
            time.sleep(0.25)
        holder.execute("ROLLBACK")
        holder.close()
        deadline = time.monotonic() + 60
        while True:
            runs = [requests.get(f"{api}/v1/runs/{i}", timeout=10).json() for i in ids]
            if all(r["status"] != "running" for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        tasks = requests.get(f"{emu}/_emulator/tasks", timeout=10).json()
        ready_after = requests.get(f"{api}/readyz", timeout=10).status_code
    assert 503 in readiness, readiness
    assert [r["status"] for r in runs] == ["succeeded"] * 4, runs
    assert len(tasks) == 4 * 3
    assert ready_after == 200
    assert "workers" in said, said  # which loop could not run, and why


def test_a_trickled_body_is_cut_off_and_shutdown_stays_within_the_grace(tmp_path: Path) -> None:
    """A client sends headers then a byte a second: after BODY_READ_TIMEOUT_S the request
    is answered 408 and its handler freed. On SIGTERM with such a client still
    connected and a job in flight, the process exits within DRAIN_DELAY_S +
    SHUTDOWN_GRACE_S (not their sum twice over), exit code 0."""
    emu_port, port = free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    env = serve_env(
        emu, port, tmp_path / "state.db", SECRET,
        BODY_READ_TIMEOUT_S="2", DRAIN_DELAY_S="1", SHUTDOWN_GRACE_S="3",
    )  # fmt: skip
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", "8", "--webhook-secret",
                  SECRET, port=emu_port, log=tmp_path / "emu.log"),
        wavechain("serve", port=port, log=tmp_path / "serve.log", env=env) as proc,
    ):  # fmt: skip
        # A synchronous Hunyuan Image 3 call that takes 8 s: a job still running at the end.
        spec: Any = {"stages": {"k": {"model": "hunyuan/hunyuan-image-v3-text-to-image",
                                 "input": {"prompt": "x"}}}}  # fmt: skip
        requests.post(f"http://127.0.0.1:{port}/v1/runs", json={"pipeline": spec}, timeout=10)
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(
            b"POST /webhooks/wavespeed/abcdefgh HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        )
        slow.settimeout(10)
        sent_at = time.monotonic()
        answer = b""
        try:
            while not answer:
                slow.sendall(b"x")
                time.sleep(0.5)
                slow.setblocking(False)
                try:
                    answer = slow.recv(4096)
                except BlockingIOError:
                    pass
                finally:
                    slow.setblocking(True)
                assert time.monotonic() - sent_at < 8, "the trickled body was never cut off"
        except (BrokenPipeError, ConnectionResetError):
            answer = answer or b"closed"
        assert answer.startswith(b"HTTP/1.1 408") or answer == b"closed", answer
        slow.close()
        again = socket.create_connection(("127.0.0.1", port))  # another trickler, left open
        again.sendall(b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        took = time.monotonic() - stop
        again.close()
    assert code == 0
    assert took < 1 + 3 + 1.5, f"shutdown took {took:.1f} s"


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    """MAX_CONNECTIONS idle connections held open: one more is closed by the server at
    once; when one of the first closes, new connections are served again."""
    emu_port, port = free_port(), free_port()
    env = serve_env(f"http://127.0.0.1:{emu_port}", port, tmp_path / "state.db", SECRET,
                    MAX_CONNECTIONS="10")  # fmt: skip
    with wavechain("serve", port=port, log=tmp_path / "serve.log", env=env):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(5)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            refused = extra.recv(100) == b""
        except ConnectionResetError:
            refused = True
        extra.close()
        held.pop().close()
        time.sleep(0.3)
        served = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
        for conn in held:
            conn.close()
    assert refused and served == 200
