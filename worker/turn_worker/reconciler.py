"""The reconciler: jobs whose worker died, or whose broker message was lost, are run again.

The database is the source of truth (invariant 1): whatever the broker lost, a queued job
that is its conversation's next is sent again, and a running job whose lease has expired
(its worker stopped renewing it: it is gone) goes back to the queue, or ends when it has used
its attempts. It needs only PostgreSQL, so it goes on while Redis is away; one worker at a
time runs it (an advisory lock). Sending a job twice is harmless: the claim is conditional.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.jobs import lifecycle
from app.logs import log_context
from app.models import Conversation, Job, JobStatus
from app.models.base import utcnow
from app.redis import get_broker_redis
from celeryconfig import TURNS_QUEUE

log = logging.getLogger("parley.reconcile")

# pg_try_advisory_xact_lock's key: "parley reconcile".
LOCK_KEY = 0x7061726C6579
# Kept in the broker's Redis: absent, the broker is new or lost what it held (restarted with
# no persistence, flushed), so every queued job's message may be gone.
BROKER_MARKER = "parley:broker-marker"
# A queued job sent this long ago, and still queued while nothing waits in the broker's turn
# queue, has lost its message: it died with the worker that held it unstarted, or the process
# that committed the job's dispatch died before publishing. With a backlog in the broker it may
# merely be waiting, and is sent again only after REDISPATCH_AFTER.
LOST_AFTER = timedelta(seconds=10)
REDISPATCH_AFTER = timedelta(minutes=5)
BATCH = 500


def reconcile(settings: Settings) -> tuple[int, int]:
    """Returns (jobs recovered from dead workers, queued jobs sent again); (0, 0) when
    another worker is reconciling."""
    with session_scope() as session:
        if not session.execute(select(func.pg_try_advisory_xact_lock(LOCK_KEY))).scalar_one():
            return 0, 0
        recovered = _recover_expired(session, settings)
        if _broker_was_emptied():
            sent = _redispatch_queued(session, sent_before=None, why="the broker lost its messages")
        elif _broker_queue_empty():
            sent = _redispatch_queued(
                session, sent_before=utcnow() - LOST_AFTER, why="no message waits for it"
            )
        else:
            sent = _redispatch_queued(
                session, sent_before=utcnow() - REDISPATCH_AFTER, why="no message seen for long"
            )
        released = _release_held(session)
    if recovered or sent or released:
        log.info(
            "reconciled: %d expired running jobs, %d queued jobs sent again, %d held jobs sent",
            recovered,
            sent,
            released,
        )
    return recovered, sent


def _recover_expired(session: Session, settings: Settings) -> int:
    expired = list(
        session.execute(
            select(Job)
            .where(Job.status == JobStatus.running, lifecycle.lease_expired())
            .order_by(Job.created_at)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    recovered = 0
    for job in expired:
        # Job ends take the conversation's lock first; here the job's is already held, so
        # lock the conversation without waiting and leave a busy one for the next round.
        if not session.execute(
            select(Conversation.id)
            .where(Conversation.id == job.conversation_id)
            .with_for_update(skip_locked=True)
        ).first():
            continue
        if job.cancel_requested:
            lifecycle.end_job(session, job, JobStatus.cancelled)
            outcome = "cancelled, as asked"
        elif job.attempts >= settings.max_turn_attempts:
            lifecycle.end_job(
                session,
                job,
                JobStatus.failed,
                error_code="worker_lost",
                error_message="The worker running this turn died.",
            )
            outcome = f"failed after {job.attempts} attempts"
        else:
            lifecycle.requeue(session, job)
            outcome = "queued again"
        recovered += 1
        with log_context(job_id=job.id):
            log.warning("its lease expired (worker presumed lost); %s", outcome)
    return recovered


def _redispatch_queued(session: Session, *, sent_before: datetime | None, why: str) -> int:
    """Send again the queued jobs that were sent before `sent_before` and have not started;
    all of them when it is None. (Held jobs were never sent: `_release_held` sends them.)"""
    due = [
        Job.status == JobStatus.queued,
        Job.enqueued_at.is_not(None),
        lifecycle.is_next_in_conversation(),
    ]
    if sent_before is not None:
        due.append(Job.enqueued_at < sent_before)
    stale = list(
        session.execute(
            select(Job)
            .where(*due)
            .order_by(Job.created_at)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    for job in stale:
        lifecycle.dispatch(session, job.id)
    if stale:
        log.info("%d queued jobs sent again (%s): %s", len(stale), why, [j.id for j in stale])
    return len(stale)


def _release_held(session: Session) -> int:
    """Send held jobs whose tenants have room in their share. Every start releases its
    tenant's next held job; this is the backstop for room made otherwise (a conversation
    deleted by retention, a release that skipped a job locked at that moment)."""
    tenants = session.execute(
        select(Job.tenant_id)
        .where(Job.status == JobStatus.queued, Job.enqueued_at.is_(None), Job.ready_at.is_not(None))
        .distinct()
        .limit(BATCH)
    ).scalars()
    return sum(lifecycle.release_held(session, tenant_id=tenant) for tenant in list(tenants))


def _broker_queue_empty() -> bool:
    """True when no turn waits in the broker's queue (False when the broker cannot say)."""
    try:
        return int(get_broker_redis().llen(TURNS_QUEUE)) == 0
    except redis.RedisError:
        return False


def _broker_was_emptied() -> bool:
    """True once after the broker's Redis came up empty (then its marker is set again)."""
    try:
        return bool(get_broker_redis().set(BROKER_MARKER, "1", nx=True))
    except redis.RedisError:
        return False  # away: asked again next round, once it is back
