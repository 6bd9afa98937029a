"""The cancel signals of every turn a worker is generating, read from Redis in one round trip.

A turn being generated is asked often whether it was cancelled (worker/inference/engine.py):
one Redis read per turn each time cost the process a round trip and the GIL per turn 20 times
a second, beside the batcher thread that needs both cores. Here one thread reads the signals
of all the turns in flight with one MGET per interval, and each turn reads its own flag.

With Redis away a turn is not cancelled: it goes on, and a cancel stored meanwhile is still
honoured when its end is stored (it is in PostgreSQL too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from redis import Redis, RedisError

from app.redis import cancel_key, cancel_requested

log = logging.getLogger("parley.cancel_watch")

# As often as a turn asked Redis itself before: a cancelled turn stops within about this long.
INTERVAL_S = 0.05


class CancelWatch:
    def __init__(self, client: Redis, *, interval_s: float = INTERVAL_S) -> None:
        self._client = client
        self._interval = interval_s
        self._cancelled: dict[str, bool] = {}  # job id -> its cancel signal, as last read
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="parley-cancel-watch", daemon=True)
        self._thread.start()

    @contextmanager
    def watching(self, job_id: str) -> Iterator[Callable[[], bool]]:
        """While the block runs, the job's cancel signal is read with the others'; yields the
        question to ask (answered from the last read, no round trip)."""
        try:
            first = cancel_requested(self._client, job_id)
        except RedisError:
            first = False
        with self._lock:
            self._cancelled[job_id] = first
        try:
            yield lambda: self._cancelled.get(job_id, False)
        finally:
            with self._lock:
                self._cancelled.pop(job_id, None)

    def _run(self) -> None:
        while True:  # as long as the process
            time.sleep(self._interval)
            with self._lock:
                jobs = [job for job, cancelled in self._cancelled.items() if not cancelled]
            if not jobs:
                continue
            try:
                signals = self._client.mget([cancel_key(job) for job in jobs])
            except RedisError as exc:
                log.debug("cancel signals not read: %s", exc)
                continue
            with self._lock:
                for job, signal in zip(jobs, signals, strict=True):
                    if signal is not None and job in self._cancelled:
                        self._cancelled[job] = True
