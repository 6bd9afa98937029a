"""The notices of jobs, for the requests that wait on them: `Prefer: wait=N` until a job
ends, and the readers of a job's event stream (app.jobs.event_stream).

One Redis subscription per API process, to the job-end notices and to the entries of every
job's stream (app.job_events), fans them out to the requests waiting on them, so a thousand
waiting clients cost one connection, not a thousand. Each API key may hold a bounded number
of requests at once (MAX_HELD_REQUESTS_PER_KEY); beyond it a request is answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator

import redis.asyncio as aioredis

from app import job_events
from app.redis import JOB_ENDED_CHANNEL

# Given to a stream's followers when entries may have been missed (the subscription was made
# again): each reads its stream again from where it is.
RESYNC = None

log = logging.getLogger("parley.waiter")


class JobWaiter:
    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._followers: dict[str, set[asyncio.Queue[job_events.Entry | None]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._held: Counter[str] = Counter()
        # While the subscription is down, job-end notices are lost: waiters re-read often.
        self.listening = False

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
                    await pubsub.subscribe(JOB_ENDED_CHANNEL, job_events.EVENTS_CHANNEL)
                    self.listening = True
                    # Notices sent while the subscription was down were missed: every
                    # waiter reads its job once more, every follower its stream.
                    self._wake_all()
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        if message["channel"] == JOB_ENDED_CHANNEL:
                            self._wake(str(message["data"]))
                        else:
                            self._pass_on(*job_events.parse_published(str(message["data"])))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # While Redis is away, waiting requests fall back to their periodic re-reads.
                log.warning("job-end subscription lost (%s); retrying", exc)
                await asyncio.sleep(1)
            finally:
                self.listening = False
                await client.aclose()

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()
        for queues in self._followers.values():
            for queue in queues:
                queue.put_nowait(RESYNC)

    def _pass_on(self, job_id: str, entry: job_events.Entry) -> None:
        for queue in self._followers.get(job_id, ()):
            queue.put_nowait(entry)

    def reserve(self, key_id: str, limit: int) -> Reservation | None:
        """A hold for a request of `key_id`, if the key has room (at most `limit` at once per
        key in this process); None if not. Runs on the event loop only, so the count needs
        no lock. A stream reserves before its response starts, so that a 429 is decided
        there, and releases when it ends."""
        if self._held[key_id] >= limit:
            return None
        self._held[key_id] += 1
        return Reservation(self, key_id)

    def _release(self, key_id: str) -> None:
        self._held[key_id] -= 1
        if not self._held[key_id]:
            del self._held[key_id]

    @contextlib.contextmanager
    def hold(self, key_id: str, limit: int) -> Iterator[bool]:
        """Whether a request of `key_id` may be held now; the hold lasts for the `with`
        block (see reserve)."""
        reservation = self.reserve(key_id, limit)
        try:
            yield reservation is not None
        finally:
            if reservation is not None:
                reservation.release()

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

    def follow(self, job_id: str) -> asyncio.Queue[job_events.Entry | None]:
        """The entries of `job_id`'s stream as they are published, and RESYNC where some may
        have been missed. Follow before reading the stream, so that none falls between."""
        queue: asyncio.Queue[job_events.Entry | None] = asyncio.Queue()
        self._followers[job_id].add(queue)
        return queue

    def unfollow(self, job_id: str, queue: asyncio.Queue[job_events.Entry | None]) -> None:
        followers = self._followers.get(job_id)
        if followers is not None:
            followers.discard(queue)
            if not followers:
                del self._followers[job_id]


class Reservation:
    """One held request's place among its key's (JobWaiter.reserve). Released once, by
    `release` or, should the request never have run (a stream whose client left before it
    started), when it is dropped."""

    def __init__(self, waiter: JobWaiter, key_id: str) -> None:
        self._waiter: JobWaiter | None = waiter
        self._key_id = key_id

    def release(self) -> None:
        if self._waiter is not None:
            self._waiter._release(self._key_id)
            self._waiter = None

    def __del__(self) -> None:
        self.release()
