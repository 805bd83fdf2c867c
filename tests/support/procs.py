"""Start wavechain commands as real processes and wait until they listen."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


@contextmanager
def running(
    args: list[str], port: int, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (stdout+stderr to ``log``) until it listens; SIGTERM it on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=out, env={**os.environ, **(env or {})})
    try:
        wait_listening(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def wavechain(
    *args: str, port: int, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``wavechain ARGS`` as a process (see ``running``)."""
    with running([sys.executable, "-m", "service.cli", *args], port, log, env) as proc:
        yield proc


def serve_env(
    emulator: str, port: int, db: Path | str, secret: str, **extra: str
) -> dict[str, str]:
    """The environment of a `wavechain serve` wired to an emulator, on ``port``."""
    return {
        "WAVESPEED_BASE_URL": emulator, "AIMLAPI_BASE_URL": emulator, "WAVECHAIN_PORT": str(port),
        "DATABASE_URL": f"sqlite:///{db}", "WAVESPEED_WEBHOOK_SECRETS": secret, **extra,
    }  # fmt: skip


class Stack(NamedTuple):
    """A serve and its emulator, as URLs."""

    api: str
    emulator: str


@contextmanager
def emulator_and_serve(
    tmp: Path, secret: str, env: Mapping[str, str], *, latency: float
) -> Iterator[str]:
    """`wavechain emulator` and `wavechain --log-json serve` as processes, wired together
    (``env`` adds to, or overrides, ``serve_env``'s); yields the API's URL. Their logs are
    ``tmp/emu.log`` and ``tmp/serve.log``."""
    with stack(tmp, secret, env, latency=latency) as urls:
        yield urls.api


@contextmanager
def stack(tmp: Path, secret: str, env: Mapping[str, str], *, latency: float) -> Iterator[Stack]:
    """``emulator_and_serve``, yielding both URLs."""
    emu_port, port = free_port(), free_port()
    emu = f"http://127.0.0.1:{emu_port}"
    full = {**serve_env(emu, port, tmp / "state.db", secret), **env}
    with (
        wavechain("emulator", "--port", str(emu_port), "--latency", str(latency),
                  "--webhook-secret", secret, port=emu_port, log=tmp / "emu.log"),
        wavechain("--log-json", "serve", port=port, log=tmp / "serve.log", env=full),
    ):  # fmt: skip
        yield Stack(f"http://127.0.0.1:{port}", emu)


def run_ended(
    api: str, run_id: str, timeout: float = 60.0, *, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Read the run over the REST API until it is no longer running; the run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = f"{api}/v1/runs/{run_id}"
        run: dict[str, Any] = requests.get(url, headers=headers, timeout=10).json()
        if run["status"] != "running":
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} still running after {timeout} s")
