"""The claims this worker process holds: the turns it is running, whose leases its heartbeat
renews (heartbeat.py) so that a live turn, however long, is never taken over."""

from __future__ import annotations

import threading


class HeldClaims:
    def __init__(self) -> None:
        self._tokens: set[str] = set()
        self._lock = threading.Lock()

    def add(self, token: str) -> None:
        with self._lock:
            self._tokens.add(token)

    def discard(self, token: str) -> None:
        with self._lock:
            self._tokens.discard(token)

    def tokens(self) -> list[str]:
        with self._lock:
            return list(self._tokens)


HELD = HeldClaims()
