from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

import redis
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.db import get_sessionmaker
from app.deps import CurrentKey, SessionDep, SettingsDep, pooled_connection
from app.errors import ProblemError, not_found
from app.jobs import event_stream, idempotency, service
from app.jobs.presenter import to_job_out
from app.jobs.schemas import JobCreate, JobOut
from app.jobs.waiter import JobWaiter
from app.logs import log_context
from app.metrics import JOBS_SUBMITTED
from app.models import TERMINAL, JobStatus
from app.pagination import CursorQuery, LimitQuery, Page
from app.queue import RUN_TURN, send_now
from app.redis import announce_job_ended, get_redis, request_cancel
from app.webhooks import events as webhook_events
from app.webhooks.schemas import WebhookAttemptOut, WebhookState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("parley.jobs")

IdempotencyKeyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
]
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d{1,6})(?:$|[,;\s])", re.IGNORECASE)
# While waiting, re-read the job's status at most this often in case a job-end notice was
# lost: often while the job-end subscription is down, seldom while it is up.
_RECHECK_SECONDS = 2.0
_RECHECK_LISTENING_SECONDS = 15.0


@router.post("", status_code=202, response_model=JobOut)
async def submit_job(
    body: JobCreate,
    request: Request,
    response: Response,
    principal: CurrentKey,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobOut:
    """Accept a chat turn. A 202 means the message and its job are durably stored."""
    tenant = principal.tenant_id
    if body.webhook_url is not None:
        # Before any connection is taken: a slow name holds up only this request.
        await webhook_events.vet_submitted_url(body.webhook_url, settings, tenant_id=tenant)
    if idempotency_key is not None:
        earlier = await _reserve(request, tenant, idempotency_key, body)
        if earlier is not None:
            response.headers["Location"] = f"/v1/jobs/{earlier}"
            response.headers["Idempotent-Replayed"] = "true"
            return await _read_job_slotted(request, tenant, earlier)
    try:
        async with pooled_connection(request) as conn, conn.transaction():
            submitted = await service.submit_turn(
                conn,
                tenant_id=tenant,
                request=body,
                settings=settings,
                unsent=request.app.state.unsent_counts,
                idempotency_key=idempotency_key,
            )
    except BaseException:
        if idempotency_key is not None:
            async with request.app.state.session_slots:
                await run_in_threadpool(_release, tenant, idempotency_key)
        raise
    job = submitted.job
    if submitted.send:
        # Committed: now the broker (its client blocks, so in a thread).
        await run_in_threadpool(send_now, RUN_TURN, [job.id])
    JOBS_SUBMITTED.inc()
    with log_context(job_id=job.id):
        log.info(
            "job accepted: tenant %s, conversation %s, turn %d",
            tenant,
            job.conversation_id,
            submitted.turn,
        )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


async def _reserve(request: Request, tenant: str, key: str, body: JobCreate) -> str | None:
    """The Idempotency-Key reserved for this request (None), or the job of the earlier
    request that used it (see app.jobs.idempotency)."""
    fingerprint = idempotency.request_fingerprint(body)

    def reserve() -> str | None:
        with get_sessionmaker()() as session:
            return idempotency.begin(session, tenant_id=tenant, key=key, fingerprint=fingerprint)

    async with request.app.state.session_slots:
        return await run_in_threadpool(reserve)


def _release(tenant: str, key: str) -> None:
    with get_sessionmaker()() as session:
        idempotency.release(session, tenant_id=tenant, key=key)


def _read_job(tenant_id: str | None, job_id: str) -> JobOut:
    with get_sessionmaker()() as session:
        return to_job_out(session, service.get_job(session, tenant_id=tenant_id, job_id=job_id))


async def _read_job_slotted(request: Request, tenant_id: str | None, job_id: str) -> JobOut:
    # A connection is used under a session slot (see app.deps.get_session); a waiting
    # request holds none between its reads.
    async with request.app.state.session_slots:
        return await run_in_threadpool(_read_job, tenant_id, job_id)


def _requested_wait(prefer: str | None, limit: int) -> int | None:
    match = _WAIT.search(f" {prefer} ") if prefer else None
    return None if match is None else min(int(match.group(1)), limit)


@router.get("/{job_id}", response_model=JobOut)
async def read_job(
    job_id: str,
    request: Request,
    response: Response,
    principal: CurrentKey,
    settings: SettingsDep,
    prefer: Annotated[str | None, Header()] = None,
) -> JobOut:
    """The job's state. `Prefer: wait=N` holds the answer until the job ends or N seconds pass."""
    wait = _requested_wait(prefer, settings.max_wait_seconds)
    waiter: JobWaiter = request.app.state.job_waiter
    with waiter.hold(principal.key_id, settings.max_held_requests_per_key) as held:
        if not wait or not held:
            # Past the key's held requests, the current state at once (no Preference-Applied).
            return await _read_job_slotted(request, principal.readable_tenant, job_id)
        response.headers["Preference-Applied"] = f"wait={wait}"
        return await _wait_for_end(request, waiter, principal.readable_tenant, job_id, wait)


async def _wait_for_end(
    request: Request, waiter: JobWaiter, tenant_id: str | None, job_id: str, wait: int
) -> JobOut:
    """While it waits, the request re-reads only its job's status, by primary key on the
    async pool (on the event loop): a thousand held requests take no thread and no session
    slot, and the whole job is read once, when it has ended or the wait is over."""
    deadline = time.monotonic() + wait
    event = waiter.subscribe(job_id)
    try:
        while True:
            async with pooled_connection(request) as conn:
                status = await service.job_status(conn, tenant_id=tenant_id, job_id=job_id)
            remaining = deadline - time.monotonic()
            if status is None or status in TERMINAL or remaining <= 0:
                return await _read_job_slotted(request, tenant_id, job_id)  # None: its 404
            recheck = _RECHECK_LISTENING_SECONDS if waiter.listening else _RECHECK_SECONDS
            # Spread out: requests held at the same moment do not all re-read together.
            recheck *= random.uniform(0.5, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, recheck))
            event.clear()
    finally:
        waiter.unsubscribe(job_id, event)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The job's events."},
        404: {"description": "No such job (or another tenant's)."},
        429: {"description": "The key holds as many waiting requests as it may."},
    },
)
async def job_events(
    job_id: str,
    request: Request,
    principal: CurrentKey,
    settings: SettingsDep,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=64)
    ] = None,
    last_event_id: Annotated[str | None, Query(max_length=64)] = None,
) -> EventSourceResponse:
    """The job's events as server-sent events: `status`, `delta`s of the reply as it is
    generated, then `done` with the Job. Those already sent are replayed first;
    `Last-Event-ID` (header or query) resumes after that event."""
    after = event_stream.resume_point(last_event_id_header or last_event_id)
    tenant = principal.readable_tenant
    waiter: JobWaiter = request.app.state.job_waiter

    async def read_status() -> JobStatus | None:
        async with pooled_connection(request) as conn:
            return await service.job_status(conn, tenant_id=tenant, job_id=job_id)

    if await read_status() is None:
        raise not_found("Job")
    if not waiter.has_room(principal.key_id, settings.max_held_requests_per_key):
        raise ProblemError(
            429,
            "This key holds as many waiting requests and streams as it may; retry later.",
            headers={"Retry-After": "5"},
        )

    async def stream() -> AsyncIterator[ServerSentEvent]:
        # Counted among the key's held requests for as long as it is read.
        with waiter.hold(principal.key_id, settings.max_held_requests_per_key) as held:
            if not held:
                return  # others took the last room meanwhile: the client reconnects
            async for event in event_stream.events(
                redis=request.app.state.async_redis,
                waiter=waiter,
                job_id=job_id,
                after=after,
                read_status=read_status,
                read_job=lambda: _read_job_slotted(request, tenant, job_id),
            ):
                yield event

    return EventSourceResponse(stream(), ping=event_stream.KEEP_ALIVE_SECONDS)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, principal: CurrentKey, session: SessionDep) -> JobOut:
    """Cancel a queued job at once; a running one stops at its next generated token."""
    job = service.get_job(session, tenant_id=principal.readable_tenant, job_id=job_id)
    running = service.cancel_job(session, job=job)
    session.commit()
    # The cancel is stored; telling the worker and the waiting clients through Redis is an
    # optimisation (the worker also reads cancel_requested when it stores the end).
    with contextlib.suppress(redis.RedisError):
        client = get_redis()
        if running:
            request_cancel(client, job.id)
        else:
            announce_job_ended(client, job.id)
    return to_job_out(session, job)


@router.get("/{job_id}/webhook-deliveries", response_model=Page[WebhookAttemptOut])
def list_deliveries(
    job_id: str,
    principal: CurrentKey,
    session: SessionDep,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> Page[WebhookAttemptOut]:
    """Every delivery attempt of the job's webhook, oldest first."""
    job = service.get_job(session, tenant_id=principal.readable_tenant, job_id=job_id)
    data, next_cursor = webhook_events.list_attempts(
        session, job_id=job.id, limit=limit, cursor=cursor
    )
    return Page(data=data, next_cursor=next_cursor)


@router.post("/{job_id}/webhook/redeliver", status_code=202, response_model=WebhookState)
def redeliver(job_id: str, principal: CurrentKey, session: SessionDep) -> WebhookState:
    """Send the job's webhook again now (same `webhook-id`), with a new round of retries.
    409 when the job has no webhook_url or has not ended."""
    job = service.get_job(session, tenant_id=principal.readable_tenant, job_id=job_id)
    state = webhook_events.redeliver(session, job=job)
    session.commit()
    return state
