"""Debian's Chromium for the dashboard's browser tests, driven by Playwright (which never
downloads a browser of its own here): found, or installed from Debian's packages."""

from __future__ import annotations

import os
import shutil
import subprocess

_CANDIDATES = ("chromium", "chromium-browser")
#: Chromium as the probe runs it here: no sandbox (root), no GPU, and nothing that would
#: reach for the closed network.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-gl=swiftshader",
    "--enable-unsafe-swiftshader",
]


def find_chromium() -> str:
    found = next((shutil.which(c) for c in _CANDIDATES if shutil.which(c)), None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("chromium is not installed and cannot be: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, capture_output=True, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=True)
        subprocess.run(install, capture_output=True, env=env, check=True)
    found = next((shutil.which(c) for c in _CANDIDATES if shutil.which(c)), None)
    if not found:
        raise RuntimeError("chromium was installed but its binary was not found")
    return found
