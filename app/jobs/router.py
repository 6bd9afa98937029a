from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.db import get_sessionmaker
from app.deps import CurrentKey, SessionDep, SettingsDep, run_in_session
from app.errors import not_found
from app.jobs import event_stream, idempotency, intake, service, waiting
from app.jobs.presenter import to_job_out
from app.jobs.schemas import JobCreate, JobOut
from app.jobs.waiter import JobWaiter
from app.pagination import CursorQuery, LimitQuery, Page
from app.webhooks import events as webhook_events
from app.webhooks.schemas import WebhookAttemptOut, WebhookState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("parley.jobs")

IdempotencyKeyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
]
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d{1,6})(?:$|[,;\s])", re.IGNORECASE)


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
        submitted = await intake.accept(
            request,
            tenant_id=tenant,
            body=body,
            settings=settings,
            idempotency_key=idempotency_key,
        )
    except BaseException:
        if idempotency_key is not None:
            async with request.app.state.session_slots:
                await run_in_threadpool(_release, tenant, idempotency_key)
        raise
    response.headers["Location"] = f"/v1/jobs/{submitted.job.id}"
    return submitted.job


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


async def _read_job_slotted(request: Request, tenant_id: str | None, job_id: str) -> JobOut:
    # A waiting request holds no connection between its reads.
    return await run_in_session(
        request,
        lambda session: to_job_out(
            session, service.get_job(session, tenant_id=tenant_id, job_id=job_id)
        ),
    )


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
        return await _wait_for_end(request, principal.readable_tenant, job_id, wait)


async def _wait_for_end(request: Request, tenant_id: str | None, job_id: str, wait: int) -> JobOut:
    # The whole job is read once, when it has ended or the wait is over (None: its 404).
    await waiting.wait_for_end(request, tenant_id, job_id, wait)
    return await _read_job_slotted(request, tenant_id, job_id)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "The job's events."}},
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

    if await waiting.read_status(request, tenant, job_id) is None:
        raise not_found("Job")
    reservation = waiting.reserve_a_hold(waiter, principal.key_id, settings)

    async def read_end() -> event_stream.Ended:
        return event_stream.job_ended(await _read_job_slotted(request, tenant, job_id))

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async for event in event_stream.follow(
            request,
            reservation=reservation,
            tenant_id=tenant,
            job_id=job_id,
            after=after,
            read_end=read_end,
        ):
            yield event_stream.to_sse(event)

    return EventSourceResponse(stream(), ping=event_stream.KEEP_ALIVE_SECONDS)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, principal: CurrentKey, session: SessionDep) -> JobOut:
    """Cancel a queued job at once; a running one stops at its next generated token."""
    job = service.get_job(session, tenant_id=principal.readable_tenant, job_id=job_id)
    running = service.cancel_job(session, job=job)
    session.commit()
    service.signal_cancel(job.id, running=running)
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
