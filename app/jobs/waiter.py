"""`Prefer: wait=N`: hold a request until its job ends.

One Redis subscription per API process fans job-end notices out to the requests waiting
on them, so a thousand waiting clients cost one connection, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

import redis.asyncio as aioredis

from app.redis import JOB_ENDED_CHANNEL

log = logging.getLogger("parley.waiter")


class JobWaiter:
    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="parley-job-waiter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self._redis_url, decode_responses=True)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(JOB_ENDED_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._wake(str(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # While Redis is away, waiting requests fall back to their periodic re-reads.
                log.warning("job-end subscription lost (%s); retrying", exc)
                await asyncio.sleep(1)
            finally:
                await client.aclose()

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def subscribe(self, job_id: str) -> asyncio.Event:
        """An event set when `job_id` is announced as ended. Subscribe before reading the
        job's state, so that an end between the read and the wait is not missed."""
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        return event

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[job_id]
