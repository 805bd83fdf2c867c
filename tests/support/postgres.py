"""A real PostgreSQL for the tests: the server at 127.0.0.1:5432 when there is one (this
machine, CI), otherwise a throwaway cluster started from the installed server binaries.
Each test session makes its own databases and drops them afterwards."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from tests.support.procs import free_port

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _binaries() -> Path:
    """The directory of initdb and pg_ctl, from pg_config or Debian's layout."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(found).parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb") or "").parent
    raise RuntimeError(
        "no PostgreSQL server: none listens on 127.0.0.1:5432 and no initdb is installed "
        "(apt-get install postgresql)"
    )


def _as_postgres(args: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: run them as the postgres user."""
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", "postgres", "--", *args]


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """initdb + pg_ctl start on a free port in a temporary directory; its admin URL."""
    bindir = _binaries()
    root = Path(tempfile.mkdtemp(prefix="wavechain-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    port = free_port()
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                      "--auth=trust", "-E", "UTF8", "--no-sync"]),
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-w",
                      "-l", str(root / "server.log"), "start"]),
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False, capture_output=True,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def postgres_admin() -> Iterator[str]:
    """An admin URL of a running server: the local one, or a throwaway cluster."""
    if _listening("127.0.0.1", 5432):
        yield LOCAL
        return
    with throwaway_cluster() as url:
        yield url


def _with_database(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


class Databases:
    """Makes fresh databases on one server; drops every one of them at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.prefix = f"wavechain_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._made: list[str] = []

    async def create(self) -> str:
        name = f"{self.prefix}_{len(self._made)}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self._made.append(name)
        return _with_database(self.admin_url, name)

    async def drop_all(self) -> None:
        deadline = time.monotonic() + 30
        conn = await asyncpg.connect(self.admin_url)
        try:
            for name in self._made:
                while True:
                    try:
                        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                        break
                    except asyncpg.PostgresError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)  # noqa: ASYNC251 - teardown, nothing else runs
        finally:
            await conn.close()
        self._made.clear()
