"""The reconciler: jobs whose worker died, or whose broker message was lost, are run again.

The database is the source of truth (invariant 1): whatever the broker lost, a queued job
that is its conversation's next is sent again, and a running job whose lease has expired
(its worker stopped renewing it: it is gone) goes back to the queue, or ends when it has used
its attempts. It needs only PostgreSQL, so it goes on while Redis is away; one worker at a
time runs it (an advisory lock). Sending a job twice is harmless: the claim is conditional.
"""

from __future__ import annotations

import logging
from datetime import timedelta

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

log = logging.getLogger("parley.reconcile")

# pg_try_advisory_xact_lock's key: "parley reconcile".
_LOCK_KEY = 0x7061726C6579
# Kept in the broker's Redis: absent, the broker is new or lost what it held (restarted with
# no persistence, flushed), so every queued job's message may be gone.
BROKER_MARKER = "parley:broker-marker"
# A queued job whose message the broker still has is merely waiting; one sent this long ago
# and still queued has lost it some other way (a publish that failed after its commit).
REDISPATCH_AFTER = timedelta(minutes=5)
BATCH = 500


def reconcile(settings: Settings) -> tuple[int, int]:
    """Returns (jobs recovered from dead workers, queued jobs sent again); (0, 0) when
    another worker is reconciling."""
    with session_scope() as session:
        if not session.execute(select(func.pg_try_advisory_xact_lock(_LOCK_KEY))).scalar_one():
            return 0, 0
        recovered = _recover_expired(session, settings)
        sent = _redispatch_queued(session, everything=_broker_was_emptied())
    if recovered or sent:
        log.info("reconciled: %d expired running jobs, %d queued jobs sent again", recovered, sent)
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
        with log_context(job_id=job.id):
            log.warning("its lease expired (worker presumed lost); %s", outcome)
    return len(expired)


def _redispatch_queued(session: Session, *, everything: bool) -> int:
    """Send again the queued jobs that are next in their conversation and were sent long ago
    (or never), or all of them when the broker was emptied."""
    due = [Job.status == JobStatus.queued, lifecycle.is_next_in_conversation()]
    if not everything:
        due.append(Job.enqueued_at.is_(None) | (Job.enqueued_at < utcnow() - REDISPATCH_AFTER))
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
        lifecycle.dispatch(session, job)
    if stale:
        why = "the broker lost its messages" if everything else "no message seen for long"
        log.info("%d queued jobs sent again (%s): %s", len(stale), why, [j.id for j in stale])
    return len(stale)


def _broker_was_emptied() -> bool:
    """True once after the broker's Redis came up empty (then its marker is set again)."""
    try:
        return bool(get_broker_redis().set(BROKER_MARKER, "1", nx=True))
    except redis.RedisError:
        return False  # away: asked again next round, once it is back
