"""`GET /v1/jobs/{id}/events`: a job's events as server-sent events, replayed, then live.

The events come from the job's Redis Stream (app.job_events), appended by the worker as it
decodes: the stream is read from where the reader is (`Last-Event-ID`), then followed through
the process's one subscription (app.jobs.waiter). The database is read only to learn that a
job has ended when its stream cannot say so, and for the Job of the `done` event; a reader
holds no connection while it waits.

Every job was queued first, and its stream begins when a worker takes it, so the `queued`
status is told by the reader itself, with an id before any the stream makes. A job whose
stream has expired replays as one delta holding its whole reply, then `done`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from fastapi import Request
from sse_starlette import ServerSentEvent

from app import job_events
from app.errors import ProblemError
from app.jobs import waiting
from app.jobs.schemas import JobOut
from app.jobs.waiter import RESYNC, JobWaiter, Reservation
from app.models import TERMINAL, JobStatus

# Ids of the events a reader makes up, before any the stream makes (`ms-seq`, ms > 0).
QUEUED_ID, REPLY_ID, DONE_ID = "0-1", "0-2", "0-3"
# A comment line at least this often keeps an idle stream open through proxies (api.md).
KEEP_ALIVE_SECONDS = 15
# A stream that says nothing for this long: has its job ended without its end reaching the
# stream (Redis was away when it ended)? One status read by primary key tells.
RECHECK_SECONDS = 15.0

StatusReader = Callable[[], Awaitable[JobStatus | None]]


@dataclass(frozen=True)
class Ended:
    """An ended job as `done` carries it (`data`: the Job for GET /v1/jobs/{id}/events, a
    response for app.responses), and the reply it holds (replayed when the deltas expired)."""

    data: Any
    reply: str | None


EndReader = Callable[[], Awaitable[Ended]]


@dataclass(frozen=True)
class JobEvent:
    """`status` and `delta` carry their data (`{"status"}`, `{"text"}`), `done` the ended
    job as its EndReader read it."""

    id: str
    kind: Literal["status", "delta", "done"]
    data: Any


def job_ended(job: JobOut) -> Ended:
    return Ended(job, None if job.reply is None else job.reply.content)


def to_sse(event: JobEvent) -> ServerSentEvent:
    """An event of GET /v1/jobs/{id}/events, `done` carrying the Job."""
    if event.kind == "done":
        job: JobOut = event.data
        return ServerSentEvent(job.model_dump_json(), event="done", id=event.id)
    return ServerSentEvent(
        json.dumps(event.data, ensure_ascii=False), event=event.kind, id=event.id
    )


def resume_point(value: str | None) -> str | None:
    """A `Last-Event-ID` as given; a 422 if no event of Parley's has that id."""
    if value is None:
        return None
    try:
        job_events.id_key(value)
    except ValueError:
        raise ProblemError(
            422,
            "Last-Event-ID must be the id of an event of this stream.",
            errors=[{"loc": ["header", "Last-Event-ID"], "msg": "not an event id"}],
        ) from None
    return value


async def follow(
    request: Request,
    *,
    reservation: Reservation,
    tenant_id: str | None,
    job_id: str,
    after: str | None,
    read_end: EndReader,
) -> AsyncIterator[JobEvent]:
    """`events` for a request, which holds `reservation` (its place among its key's held
    requests, waiting.reserve_a_hold) until the stream ends."""
    try:
        async for event in events(
            redis=request.app.state.async_redis,
            waiter=request.app.state.job_waiter,
            job_id=job_id,
            after=after,
            read_status=lambda: waiting.read_status(request, tenant_id, job_id),
            read_end=read_end,
        ):
            yield event
    finally:
        reservation.release()


async def events(
    *,
    redis: aioredis.Redis,
    waiter: JobWaiter,
    job_id: str,
    after: str | None,
    read_status: StatusReader,
    read_end: EndReader,
) -> AsyncIterator[JobEvent]:
    """The job's events after the event `after` (all of them for None), until `done`."""
    reader = _Reader(after)
    queue = waiter.follow(job_id)
    try:
        key = job_events.stream_key(job_id)
        rows = await redis.xrange(key, min=_after(reader.last))
        if not rows and not await redis.exists(key) and _ended(await read_status()):
            # Long ended: its deltas have expired. The reply is in the database.
            for event in await _replayed_end(reader, read_end):
                yield event
            return
        if reader.before(QUEUED_ID):
            yield reader.event(QUEUED_ID, "status", {"status": "queued"})
        pending, lost_end = job_events.parse_entries(rows), False
        while True:
            for entry in pending:
                if not reader.before(entry.id):
                    continue
                if entry.event == "end":
                    yield await _done(reader, entry.id, read_end)
                    return
                yield reader.entry(entry)
            if lost_end:
                yield await _done(reader, job_events.next_id(reader.last), read_end)
                return
            pending, lost_end = await _next(redis, key, reader, queue, read_status)
    except ProblemError:
        return  # the job was deleted meanwhile (its conversation was): nothing more to tell
    finally:
        waiter.unfollow(job_id, queue)


class _Reader:
    """Where a reader is in the stream: the id of the last event it has."""

    def __init__(self, after: str | None) -> None:
        self.last = after or "0-0"

    def before(self, entry_id: str) -> bool:
        """Whether `entry_id` comes after what the reader has."""
        return job_events.id_key(entry_id) > job_events.id_key(self.last)

    def event(self, entry_id: str, kind: Literal["status", "delta", "done"], data: Any) -> JobEvent:
        self.last = entry_id
        return JobEvent(entry_id, kind, data)

    def entry(self, entry: job_events.Entry) -> JobEvent:
        if entry.event == "delta":
            return self.event(entry.id, "delta", {"text": entry.data})
        return self.event(entry.id, "status", {"status": entry.data})


async def _next(
    redis: aioredis.Redis,
    key: str,
    reader: _Reader,
    queue: asyncio.Queue[job_events.Entry | None],
    read_status: StatusReader,
) -> tuple[list[job_events.Entry], bool]:
    """The next entries after the reader's, as they are published, and whether the job has
    ended without its stream saying so (Redis was away when it ended)."""
    try:
        item = await asyncio.wait_for(queue.get(), RECHECK_SECONDS)
    except TimeoutError:
        if not _ended(await read_status()):
            return [], False
        item = RESYNC
    if item is not RESYNC:
        return [item], False
    # Entries may have been missed: the stream itself has them.
    entries = job_events.parse_entries(await redis.xrange(key, min=_after(reader.last)))
    if any(entry.event == "end" for entry in entries):
        return entries, False
    return entries, _ended(await read_status())


def _ended(status: JobStatus | None) -> bool:
    """None: the job is gone (deleted with its conversation), which ends its stream too."""
    return status is None or status in TERMINAL


async def _replayed_end(reader: _Reader, read_end: EndReader) -> list[JobEvent]:
    ended = await read_end()
    replayed = []
    if ended.reply is not None and reader.before(REPLY_ID):
        replayed.append(reader.event(REPLY_ID, "delta", {"text": ended.reply}))
    # A reader resuming after events of the stream itself, now expired, gets the end alone:
    # the Job holds the whole reply.
    done_id = DONE_ID if reader.before(DONE_ID) else job_events.next_id(reader.last)
    replayed.append(reader.event(done_id, "done", ended.data))
    return replayed


async def _done(reader: _Reader, entry_id: str, read_end: EndReader) -> JobEvent:
    return reader.event(entry_id, "done", (await read_end()).data)


def _after(entry_id: str) -> str:
    """XRANGE's exclusive start."""
    return f"({entry_id}"
