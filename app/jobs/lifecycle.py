"""The states of a turn, shared by the API and the worker.

Every transition that decides which job of a conversation may run takes the conversation's
row lock first, so submissions and job ends of one conversation are serialised and jobs run
one at a time in acceptance order (invariant 4). A job is sent to the broker only when it is
its conversation's next one (it is *ready*); the job that ends makes the next ready. A ready
job is sent at once while its tenant has room in its fair share of the broker, and otherwise
held until one of its tenant's sent jobs starts (app.jobs.fair_share).
"""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from app.jobs import fair_share, statements
from app.jobs.presenter import to_job_out
from app.models import UNFINISHED, Conversation, Job, JobStatus, reply_message_id, reply_seq
from app.models.base import utcnow
from app.queue import RUN_TURN, enqueue_after_commit
from app.schemas import GenerationSettings
from app.webhooks import events as webhook_events

# Built once: constructing an alias per claim costs more than running the claim's SQL.
_EARLIER = aliased(Job, name="earlier")


def lock_conversation(
    session: Session, conversation_id: str, *, tenant_id: str | None = None
) -> Conversation | None:
    """The conversation, row-locked; with `tenant_id`, only if it is that tenant's, so that a
    request naming another tenant's conversation neither waits for its lock nor takes it."""
    query = select(Conversation).where(Conversation.id == conversation_id)
    if tenant_id is not None:
        query = query.where(Conversation.tenant_id == tenant_id)
    return session.execute(query.with_for_update()).scalar_one_or_none()


def dispatch(session: Session, job_id: str) -> None:
    """Send the job to the workers once the transaction commits."""
    _core(session).execute(statements.SEND, {"job": job_id, "now": utcnow()})
    enqueue_after_commit(session, RUN_TURN, [job_id])


def release_held(session: Session, *, tenant_id: str) -> int:
    """Send as many of the tenant's held jobs as its share has room for, oldest ready first.
    Called wherever a sent job leaves the broker's queue (it started, or ended unstarted).
    Returns how many were sent."""
    fair_share.lock_tenant(session, tenant_id)
    # One statement after the lock (whose count must see every start committed before it):
    # the room, the held jobs it admits and their sending.
    rows = _core(session).execute(
        statements.RELEASE_HELD,
        {"tenant": tenant_id, "share": fair_share.share(tenant_id), "now": utcnow()},
    )
    released = sorted(rows, key=lambda row: (row.ready_at, row.id))
    for row in released:
        enqueue_after_commit(session, RUN_TURN, [row.id])
    return len(released)


def release_next(session: Session, *, conversation_id: str) -> None:
    """After a job of the conversation ended: its next one, if queued, is ready; it is sent,
    or held past its tenant's share. The caller holds the conversation's row lock."""
    ready = (
        _core(session)
        .execute(statements.NEXT_READY, {"conversation": conversation_id, "now": utcnow()})
        .first()
    )
    if ready is not None and fair_share.has_room(session, ready.tenant_id):
        dispatch(session, ready.id)


def _core(session: Session) -> Connection:
    """The session's connection, for the Core statements of app.jobs.statements. The session's
    pending changes (an ORM caller's job end) are flushed first, so that they see them as the
    session's own queries would."""
    session.flush()
    return session.connection()


@dataclass(frozen=True)
class Claim:
    """A job claimed by a worker, and what generating its turn needs, as the claim's own
    statement returned them."""

    job_id: str
    token: str
    attempts: int
    conversation_id: str
    turn: int
    generation: GenerationSettings
    system_prompt: str | None
    message: str
    # The last succeeded turn before this one (0: none): what its context must cover.
    context_upto: int
    # From acceptance to this claim.
    queued_s: float


def is_next_in_conversation() -> ColumnElement[bool]:
    """SQL: no earlier job of the job's conversation is unfinished."""
    earlier = _EARLIER
    return ~exists().where(
        earlier.conversation_id == Job.conversation_id,
        earlier.turn < Job.turn,
        earlier.status.in_(UNFINISHED),
    )


def lease_expired() -> ColumnElement[bool]:
    """SQL: the running job's lease has run out (on the database's clock, the one clock every
    worker shares): its worker stopped renewing it and is presumed dead."""
    return Job.lease_expires_at < func.now()


def lease_until(lease_seconds: int) -> ColumnElement[datetime]:
    return func.now() + timedelta(seconds=lease_seconds)


def claim(session: Session, *, job_id: str, lease_seconds: int) -> Claim | None:
    """Take the job for this worker: queued (or running under an expired lease, its worker
    presumed dead) and first among its conversation's unfinished jobs. None: not ours to run
    (already claimed, ended, cancelled, deleted, or not yet its turn)."""
    token = secrets.token_hex(16)
    parameters = {
        "job": job_id,
        "token": token,
        "lease": timedelta(seconds=lease_seconds),
        "now": utcnow(),
    }
    row = _core(session).execute(statements.CLAIM, parameters).first()
    if row is None:
        return None
    # The job leaves the broker's queue: its tenant's next held job may take its place. Last
    # in the claim: the tenant's lock is held from here to the commit, and every other claim
    # of the tenant waits for it.
    release_held(session, tenant_id=row.tenant_id)
    return Claim(
        job_id=job_id,
        token=token,
        attempts=row.attempts,
        conversation_id=row.conversation_id,
        turn=row.turn,
        generation=row.generation,
        system_prompt=row.system_prompt,
        message=row.content,
        context_upto=row.context_upto,
        queued_s=(row.started_at - row.created_at).total_seconds(),
    )


def renew_leases(session: Session, *, tokens: Collection[str], lease_seconds: int) -> int:
    """Extend the leases of the running jobs these claims hold (a worker's heartbeat): a live
    turn, however long, keeps its claim. Returns how many were renewed."""
    if not tokens:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.claim_token.in_(list(tokens)), Job.status == JobStatus.running)
        .values(lease_expires_at=lease_until(lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def owned_job(session: Session, claim: Claim) -> Job | None:
    """The job, locked, if this claim still owns it (not re-claimed, cancelled by deletion...)."""
    return session.execute(
        select(Job)
        .where(
            Job.id == claim.job_id,
            Job.status == JobStatus.running,
            Job.claim_token == claim.token,
        )
        .with_for_update()
    ).scalar_one_or_none()


@dataclass(frozen=True)
class Outcome:
    """How a claimed turn ended, as its worker stores it."""

    status: JobStatus
    # A success's reply.
    reply: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    context_messages: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


def end_claimed(session: Session, claim: Claim, outcome: Outcome) -> JobStatus | None:
    """Store a claimed turn's end, as end_job does, with its reply when it succeeded: a
    success asked to be cancelled meanwhile ends cancelled, without it. Returns the status
    stored; None when the claim no longer owns the job (re-claimed, or deleted with its
    conversation), and then nothing is stored."""
    connection = _core(session)
    conversation = {"conversation": claim.conversation_id}
    if connection.execute(statements.LOCK_CONVERSATION, conversation).first() is None:
        return None
    now = utcnow()
    ended = connection.execute(
        statements.END_CLAIMED,
        {
            "job": claim.job_id,
            "token": claim.token,
            "outcome": outcome.status.value,
            "now": now,
            "code": outcome.error_code,
            "message": outcome.error_message,
            "context_count": outcome.context_messages,
            "prompt_count": outcome.prompt_tokens,
            "completion_count": outcome.completion_tokens,
            "reason": outcome.finish_reason,
        },
    ).first()
    if ended is None:
        return None
    status = JobStatus(ended.status)
    if status == JobStatus.succeeded:
        assert outcome.reply is not None, "a success stores its reply"
        connection.execute(
            statements.ADD_REPLY,
            {
                **conversation,
                "reply_id": reply_message_id(claim.job_id),
                "job": claim.job_id,
                "reply_seq": reply_seq(claim.turn),
                "reply": outcome.reply,
                "now": now,
            },
        )
    if ended.webhook_url is not None:
        job = session.get_one(Job, claim.job_id, populate_existing=True)
        _record_webhook_event(session, job)
    release_next(session, conversation_id=claim.conversation_id)
    return status


def _record_webhook_event(session: Session, job: Job) -> None:
    # In the job end's transaction: a job end and its webhook event are stored together or
    # not at all.
    webhook_events.record_job_end(
        session, job, data=to_job_out(session, job).model_dump(mode="json")
    )


def end_job(
    session: Session,
    job: Job,
    status: JobStatus,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    """Move `job` to a terminal state, write its webhook event, and release its
    conversation's next job. The caller holds the conversation's row lock."""
    unstarted_sent = job.status == JobStatus.queued and job.enqueued_at is not None
    job.status = status
    job.finished_at = utcnow()
    job.lease_expires_at = None
    job.error_code = error_code
    job.error_message = error_message
    if job.webhook_url is not None:
        _record_webhook_event(session, job)
    release_next(session, conversation_id=job.conversation_id)
    if unstarted_sent:
        release_held(session, tenant_id=job.tenant_id)


def requeue(session: Session, job: Job) -> None:
    """Give a claimed job back to the queue (a retry after a transient failure). Sent at once,
    past its tenant's share if need be: it had its turn, and was interrupted."""
    job.status = JobStatus.queued
    job.claim_token = None
    job.lease_expires_at = None
    dispatch(session, job.id)
