"""Submitting, reading and cancelling turns (the API's side of a job)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ProblemError, not_found
from app.ids import new_id, plausible_id
from app.jobs import fair_share, lifecycle, repository
from app.jobs.schemas import JobCreate, JobOut
from app.models import UNFINISHED, Job, JobStatus, reply_message_id, reply_seq, user_seq
from app.models.base import utcnow
from app.redis import announce_job_ended, get_redis, request_cancel
from app.schemas import ChatMessage, GenerationSettings
from app.webhooks.schemas import WebhookState


def resolve_generation(request: JobCreate, settings: Settings) -> GenerationSettings:
    """The request's generation settings with the server's defaults filled in."""
    gen = request.generation
    max_new = gen.max_new_tokens if gen and gen.max_new_tokens is not None else None
    if max_new is not None and max_new > settings.max_new_tokens_limit:
        raise ProblemError(
            422,
            f"generation.max_new_tokens may be at most {settings.max_new_tokens_limit}.",
            errors=[{"loc": ["body", "generation", "max_new_tokens"], "msg": "too large"}],
        )
    return GenerationSettings(
        max_new_tokens=max_new or settings.default_max_new_tokens,
        temperature=gen.temperature if gen and gen.temperature is not None else 0.0,
        top_p=gen.top_p if gen and gen.top_p is not None else 1.0,
        seed=gen.seed if gen else None,
    )


@dataclass(frozen=True)
class Submitted:
    job: JobOut
    turn: int
    # The job is its conversation's next and within its tenant's share: the caller sends it
    # to the workers once the transaction has committed.
    send: bool


async def submit_turn(
    conn: AsyncConnection[TupleRow],
    *,
    tenant_id: str,
    request: JobCreate,
    settings: Settings,
    unsent: UnsentCounts,
    idempotency_key: str | None = None,
    earlier_turns: Sequence[tuple[str, str]] = (),
    follows_turn: int | None = None,
    background: bool | None = None,
) -> Submitted:
    """Store the user's message and its job in `conn`'s transaction, which the caller commits.

    A new conversation may start with `earlier_turns`, (user message, reply) pairs stored as
    turns that succeeded; a turn of an existing one, given `follows_turn`, must come right
    after that turn (else 409: another turn was accepted since). `background` is stored as
    the Responses API's request said.

    The tenant's counts (capacity and fair share) in one read, the conversation in one write
    (a turn of an existing conversation is an UPDATE, which takes its row lock: turns of one
    conversation are numbered one at a time), the job and its message in one more; the
    statements are app.jobs.repository's."""
    # The checks of the request itself first; then those that cost a lookup.
    if request.conversation_id is not None and request.system_prompt is not None:
        raise ProblemError(
            422,
            "system_prompt can only be given when starting a new conversation.",
            errors=[{"loc": ["body", "system_prompt"], "msg": "not allowed with conversation_id"}],
        )
    generation = resolve_generation(request, settings)
    # request.webhook_url has been vetted by the caller, before it took a connection
    # (app.webhooks.events.vet_submitted_url: a lookup must not hold one).
    limit, share = settings.max_unfinished_jobs_per_tenant, settings.fair_share(tenant_id)
    load = {"tenant": tenant_id, "limit": limit, "share": share}
    unfinished, sent = await _one(conn, repository.TENANT_LOAD, load)
    if unfinished >= limit:
        raise ProblemError(
            429,
            f"This tenant has {limit} unfinished jobs, the most allowed; "
            "retry when some have ended.",
            headers={"Retry-After": "5"},
        )
    now = utcnow()
    if request.conversation_id is None:
        conversation_id, turn = new_id("conv"), len(earlier_turns) + 1
        await conn.execute(
            repository.NEW_CONVERSATION,
            {
                "id": conversation_id,
                "tenant": tenant_id,
                "system_prompt": request.system_prompt,
                "metadata": Jsonb(dict(request.metadata)),
                "turns": turn,
                "messages": 2 * turn - 1,
                "now": now,
            },
        )
        for number, (message, reply) in enumerate(earlier_turns, start=1):
            await _import_turn(
                conn,
                tenant_id=tenant_id,
                conversation_id=conversation_id,
                turn=number,
                message=message,
                reply=reply,
                generation=generation,
                now=now,
            )
        is_next = True
    else:
        conversation_id = request.conversation_id
        row = None
        if plausible_id(conversation_id):
            next_turn = {"id": conversation_id, "tenant": tenant_id, "now": now}
            row = await (await conn.execute(repository.NEXT_TURN, next_turn)).fetchone()
        if row is None:
            raise not_found("Conversation")
        turn = int(row[0])
        if follows_turn is not None and turn != follows_turn + 1:
            raise ProblemError(
                409, "The previous response is not its conversation's latest any more."
            )
        earlier = {"conversation": conversation_id, "turn": turn}
        (waits,) = await _one(conn, repository.EARLIER_UNFINISHED, earlier)
        is_next = not waits
    send = False
    if is_next:
        send = sent < share
        if not send:
            # At the share: decide under the tenant's lock (see app.jobs.fair_share).
            lock = {"namespace": fair_share.LOCK_NAMESPACE, "tenant": tenant_id}
            await conn.execute(repository.TENANT_LOCK, lock)
            (recount,) = await _one(conn, repository.SENT_WAITING, load)
            send = recount < share
    job_id = new_id("job")
    await conn.execute(
        repository.NEW_JOB,
        {
            "id": job_id,
            "tenant": tenant_id,
            "conversation": conversation_id,
            "turn": turn,
            "generation": Jsonb(generation.model_dump(mode="json")),
            "metadata": Jsonb(dict(request.metadata)),
            "webhook_url": request.webhook_url,
            "now": now,
            "ready_at": now if is_next else None,
            "enqueued_at": now if send else None,
            "message_id": new_id("msg"),
            "seq": user_seq(turn),
            "content": request.message,
            "background": background,
        },
    )
    if idempotency_key is not None:
        done = {"job": job_id, "tenant": tenant_id, "key": idempotency_key}
        await conn.execute(repository.IDEMPOTENCY_DONE, done)
    job = JobOut(
        id=job_id,
        conversation_id=conversation_id,
        status=JobStatus.queued,
        message=ChatMessage(role="user", content=request.message),
        queue_position=await _queue_position(
            conn, tenant_id=tenant_id, job_id=job_id, at=now, sent=send, unsent=unsent
        ),
        created_at=now,
        webhook=None
        if request.webhook_url is None
        else WebhookState(url=request.webhook_url, status="pending", attempts=0),
        metadata=dict(request.metadata),
    )
    return Submitted(job=job, turn=turn, send=send)


async def _import_turn(
    conn: AsyncConnection[TupleRow],
    *,
    tenant_id: str,
    conversation_id: str,
    turn: int,
    message: str,
    reply: str,
    generation: GenerationSettings,
    now: datetime,
) -> None:
    job_id = new_id("job")
    await conn.execute(
        repository.IMPORTED_TURN,
        {
            "id": job_id,
            "tenant": tenant_id,
            "conversation": conversation_id,
            "turn": turn,
            "generation": Jsonb(generation.model_dump(mode="json")),
            "metadata": Jsonb({}),
            "now": now,
            "user_id": new_id("msg"),
            "user_seq": user_seq(turn),
            "user": message,
            "reply_id": reply_message_id(job_id),
            "reply_seq": reply_seq(turn),
            "reply": reply,
        },
    )


async def _one(conn: AsyncConnection[TupleRow], query: str, params: dict[str, Any]) -> TupleRow:
    row = await (await conn.execute(query, params)).fetchone()
    assert row is not None  # an aggregate: always one row
    return row


class UnsentCounts:
    """Per tenant, its queued jobs not sent to the broker, read at most once a second by this
    process (app.state.unsent_counts). A submit's queue_position weighs the other tenants'
    backlogs with these, a second old at most (the position is an estimate, api.md says so):
    counting every held job for each submit cost it more than all its other statements."""

    MAX_AGE_S = 1.0

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._read_at = -math.inf
        self._lock = asyncio.Lock()

    async def get(self, conn: AsyncConnection[TupleRow]) -> dict[str, int]:
        if time.monotonic() - self._read_at > self.MAX_AGE_S:
            async with self._lock:
                if time.monotonic() - self._read_at > self.MAX_AGE_S:
                    rows = await (await conn.execute(repository.UNSENT_BY_TENANT)).fetchall()
                    self._counts = {str(tenant): int(count) for tenant, count in rows}
                    self._read_at = time.monotonic()
        return self._counts


async def _queue_position(
    conn: AsyncConnection[TupleRow],
    *,
    tenant_id: str,
    job_id: str,
    at: datetime,
    sent: bool,
    unsent: UnsentCounts,
) -> int:
    """fair_share.sent_position or held_position of the job just written (accepted, and if
    `sent` sent, `at`), the other tenants' backlogs from `unsent`."""
    place = {"tenant": tenant_id, "at": at, "id": job_id}
    if sent:
        (before,) = await _one(conn, repository.SENT_BEFORE, place)
        return int(before)
    sent_jobs, own_ahead = await _one(conn, repository.SENT_AND_OWN_UNSENT_BEFORE, place)
    return fair_share.position_when_held(
        tenant_id, sent=sent_jobs, own_ahead=own_ahead, unsent=await unsent.get(conn)
    )


async def job_status(
    conn: AsyncConnection[TupleRow], *, tenant_id: str | None, job_id: str
) -> JobStatus | None:
    """The job's status, read as get_job would find it (None: get_job answers 404)."""
    if not plausible_id(job_id):
        return None
    row = await (
        await conn.execute(repository.JOB_STATUS, {"id": job_id, "tenant": tenant_id})
    ).fetchone()
    return None if row is None else JobStatus(row[0])


def get_job(session: Session, *, tenant_id: str | None, job_id: str) -> Job:
    """The job, if it exists and (unless `tenant_id` is None, for admins) is the tenant's."""
    job = session.get(Job, job_id) if plausible_id(job_id) else None
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        raise not_found("Job")
    return job


def cancel_job(session: Session, *, job: Job) -> bool:
    """Cancel a queued job at once, or ask the worker to stop a running one.
    Returns True when a worker must be told (the job is running)."""
    conversation = lifecycle.lock_conversation(session, job.conversation_id)
    session.refresh(job, with_for_update=True)
    if conversation is None:
        raise not_found("Job")  # deleted with its conversation meanwhile
    if job.status not in UNFINISHED:
        raise ProblemError(409, f"The job has already ended ({job.status}).")
    job.cancel_requested = True
    if job.status == JobStatus.queued:
        lifecycle.end_job(session, job, JobStatus.cancelled)
        return False
    return True


def signal_cancel(job_id: str, *, running: bool) -> None:
    """Once a cancel is committed: tell the worker running the job, or the requests waiting
    on a job that has ended. An optimisation, so Redis being away is no error: the worker
    reads cancel_requested when it stores the end, and waiters re-read the job."""
    with contextlib.suppress(redis.RedisError):
        client = get_redis()
        if running:
            request_cancel(client, job_id)
        else:
            announce_job_ended(client, job_id)
