"""B5's measurements: a process's memory while it exports, one timed search request."""

from __future__ import annotations

import threading
import time
from typing import Self

import httpx


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class MemorySampler:
    """Samples a process's resident memory every 20 ms; `growth`: peak above the start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss(self.pid))

    def __enter__(self) -> Self:
        self.start = self.peak = _rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def search_once(client: httpx.Client, tenant: str, q: str) -> float:
    started = time.perf_counter()
    answer = client.get("/v1/admin/conversations", params={"tenant": tenant, "q": q})
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    return elapsed
