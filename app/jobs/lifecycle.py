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

from sqlalchemy import ColumnElement, and_, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from app.jobs import fair_share
from app.jobs.presenter import to_job_out
from app.models import UNFINISHED, Conversation, Job, JobStatus
from app.models.base import utcnow
from app.queue import RUN_TURN, enqueue_after_commit
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


def dispatch(session: Session, job: Job) -> None:
    """Send `job` to the workers once the transaction commits."""
    job.enqueued_at = utcnow()
    enqueue_after_commit(session, RUN_TURN, [job.id])


def make_ready(session: Session, job: Job) -> None:
    """`job` is now its conversation's next: send it, or hold it past its tenant's share."""
    job.ready_at = utcnow()
    if fair_share.has_room(session, job.tenant_id):
        dispatch(session, job)


def release_held(session: Session, *, tenant_id: str) -> int:
    """Send as many of the tenant's held jobs as its share has room for, oldest ready first.
    Called wherever a sent job leaves the broker's queue (it started, or ended unstarted).
    Returns how many were sent."""
    room = fair_share.room(session, tenant_id)
    if room <= 0:
        return 0
    held = list(
        session.execute(
            select(Job)
            .where(
                Job.tenant_id == tenant_id,
                Job.status == JobStatus.queued,
                Job.enqueued_at.is_(None),
                Job.ready_at.is_not(None),
            )
            .order_by(Job.ready_at, Job.id)
            .limit(room)
            # A held job locked elsewhere is being cancelled or deleted: skipped, not waited
            # for (its holder may be waiting for this tenant's lock).
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    for job in held:
        dispatch(session, job)
    return len(held)


def release_next(session: Session, *, conversation_id: str) -> None:
    """After a job of the conversation ended: its next one, if queued, is ready.

    The caller holds the conversation's row lock."""
    nxt = session.execute(
        select(Job)
        .where(Job.conversation_id == conversation_id, Job.status.in_(UNFINISHED))
        .order_by(Job.turn)
        .limit(1)
    ).scalar_one_or_none()
    if nxt is not None and nxt.status == JobStatus.queued and nxt.ready_at is None:
        make_ready(session, nxt)


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempts: int


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
    # The job leaves the broker's queue: its tenant's next held job may take its place.
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.cancel_requested.is_(False),
            (Job.status == JobStatus.queued)
            | and_(Job.status == JobStatus.running, lease_expired()),
            is_next_in_conversation(),
        )
        .values(
            status=JobStatus.running,
            claim_token=token,
            attempts=Job.attempts + 1,
            lease_expires_at=lease_until(lease_seconds),
            started_at=utcnow(),
        )
        .returning(Job.attempts, Job.tenant_id)
        # A job loaded in the session is not brought up to date: a claim comes first in its
        # session (run_turn). Without this the ORM compiles an evaluator of the WHERE clause
        # on every claim.
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    release_held(session, tenant_id=row.tenant_id)
    return Claim(job_id, token, int(row.attempts))


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
        # In this transaction: a job end and its webhook event are stored together or not at all.
        webhook_events.record_job_end(
            session, job, data=to_job_out(session, job).model_dump(mode="json")
        )
    release_next(session, conversation_id=job.conversation_id)
    if unstarted_sent:
        release_held(session, tenant_id=job.tenant_id)


def requeue(session: Session, job: Job) -> None:
    """Give a claimed job back to the queue (a retry after a transient failure). Sent at once,
    past its tenant's share if need be: it had its turn, and was interrupted."""
    job.status = JobStatus.queued
    job.claim_token = None
    job.lease_expires_at = None
    dispatch(session, job)
