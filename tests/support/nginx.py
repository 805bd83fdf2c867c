"""nginx as the ingress stand-in: found on the machine, or installed from Debian's
packages (the tests run as root in CI); never skipped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.procs import wait_listening

_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx() -> str:
    """The nginx binary, installing Debian's package when it is missing."""
    found = shutil.which("nginx") or next((p for p in _CANDIDATES if Path(p).exists()), None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("nginx is not installed and cannot be: apt-get install nginx")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
    if subprocess.run(install, capture_output=True, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=True)
        done = subprocess.run(install, capture_output=True, env=env, check=False)
        if done.returncode != 0:
            install[-1] = "nginx"
            subprocess.run(install, capture_output=True, env=env, check=True)
    # The package starts a system nginx on port 80: the tests run their own.
    subprocess.run(["service", "nginx", "stop"], capture_output=True, check=False)
    found = shutil.which("nginx") or next((p for p in _CANDIDATES if Path(p).exists()), None)
    if not found:
        raise RuntimeError("nginx was installed but its binary was not found")
    return found


CONFIG = """
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    # What the ingress in front of wavechain should do too: bound slow clients, cap
    # bodies above the receiver's own cap, retry a replica that is gone.
    client_header_timeout 10s;
    client_body_timeout 10s;
    client_max_body_size 2m;
    upstream wavechain {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://wavechain;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_ingress(port: int, upstreams: Sequence[int]) -> Iterator[Path]:
    """nginx on 127.0.0.1:``port``, balancing over the ``upstreams`` ports; its folder
    (logs) while it runs."""
    binary = find_nginx()
    root = Path(tempfile.mkdtemp(prefix="wavechain-nginx-"))
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstreams
    )
    config = CONFIG.format(root=root, servers=servers, port=port)
    if os.geteuid() == 0:  # workers would otherwise drop to a user that cannot write here
        config = "user root;\n" + config
    (root / "nginx.conf").write_text(config)
    with (root / "stderr.log").open("wb") as stderr:
        proc = subprocess.Popen(
            [binary, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        wait_listening(port, proc)
        yield root
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
