"""Waiting on a job without holding a connection: `Prefer: wait` and a foreground
`POST /v1/responses` wait here for its end, and a stream takes its place among its key's
held requests here (its readers follow the job in app.jobs.event_stream)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from fastapi import Request

from app.config import Settings
from app.deps import pooled_connection
from app.errors import ProblemError
from app.jobs import service
from app.jobs.waiter import JobWaiter, Reservation
from app.models import TERMINAL, JobStatus

# While waiting, re-read the job's status at most this often in case a job-end notice was
# lost: often while the job-end subscription is down, seldom while it is up.
RECHECK_SECONDS = 2.0
RECHECK_LISTENING_SECONDS = 15.0


def reserve_a_hold(waiter: JobWaiter, key_id: str, settings: Settings) -> Reservation:
    """A stream's place among its key's held requests (MAX_HELD_REQUESTS_PER_KEY), or a 429:
    unlike a held GET, a stream cannot be answered at once instead."""
    reservation = waiter.reserve(key_id, settings.max_held_requests_per_key)
    if reservation is None:
        raise ProblemError(
            429,
            "This key holds as many waiting requests and streams as it may; retry later.",
            headers={"Retry-After": "5"},
        )
    return reservation


async def read_status(request: Request, tenant_id: str | None, job_id: str) -> JobStatus | None:
    """The job's status, by primary key on the async pool (None: no such job of the tenant's)."""
    async with pooled_connection(request) as conn:
        return await service.job_status(conn, tenant_id=tenant_id, job_id=job_id)


async def wait_for_end(
    request: Request, tenant_id: str | None, job_id: str, seconds: float
) -> JobStatus | None:
    """The job's status once it has ended, or when `seconds` have passed (None: it is gone).

    Between its reads, which are of the status alone, a waiting request holds nothing: a
    thousand of them take no thread, no connection and no session slot."""
    waiter: JobWaiter = request.app.state.job_waiter
    deadline = time.monotonic() + seconds
    event = waiter.subscribe(job_id)
    try:
        while True:
            status = await read_status(request, tenant_id, job_id)
            remaining = deadline - time.monotonic()
            if status is None or status in TERMINAL or remaining <= 0:
                return status
            recheck = RECHECK_LISTENING_SECONDS if waiter.listening else RECHECK_SECONDS
            # Spread out: requests held at the same moment do not all re-read together.
            recheck *= random.uniform(0.5, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, recheck))
            event.clear()
    finally:
        waiter.unsubscribe(job_id, event)
