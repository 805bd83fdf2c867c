"""Change notices for the dashboard's live views: the store says when something may have
changed (here, or on another replica through LISTEN/NOTIFY); every stream waiting wakes,
reads again and sends only what differs."""

from __future__ import annotations

import asyncio
import contextlib


class Changes:
    """A broadcast wake-up: ``wait`` returns at the next ``notify``, or after a timeout
    (the views also poll, for changes no notice reaches, such as another SQLite process's).
    ``close`` (at shutdown) wakes every waiter for good, so that streams end at once rather
    than holding the shutdown for its whole grace period."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """Whether a notice came (or the server is closing) before ``timeout_s``."""
        if self.closed:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)
            return True
        return False
