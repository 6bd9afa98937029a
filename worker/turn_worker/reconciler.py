"""The reconciler: jobs whose worker died, or whose broker message was lost, are run again.

The database is the source of truth (invariant 1): whatever the broker lost, a queued job
that is its conversation's next is sent again, and a running job whose lease has expired
(its worker is gone) goes back to the queue, or ends when it has used its attempts.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.jobs import lifecycle
from app.logs import log_context
from app.models import Job, JobStatus
from app.models.base import utcnow

log = logging.getLogger("parley.reconcile")


def reconcile(settings: Settings, *, redispatch_after: timedelta) -> tuple[int, int]:
    """Returns (jobs recovered from dead workers, queued jobs sent again)."""
    now = utcnow()
    with session_scope() as session:
        expired = session.execute(
            select(Job.id, Job.conversation_id)
            .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
            .limit(500)
        ).all()
    for job_id, conversation_id in expired:
        with session_scope() as session:
            if lifecycle.lock_conversation(session, conversation_id) is None:
                continue
            job = session.execute(
                select(Job)
                .where(
                    Job.id == job_id, Job.status == JobStatus.running, Job.lease_expires_at < now
                )
                .with_for_update()
            ).scalar_one_or_none()
            if job is None:
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
        with log_context(job_id=job_id):
            log.warning("its lease expired (worker presumed lost); %s", outcome)
    with session_scope() as session:
        stale = list(
            session.execute(
                select(Job)
                .where(
                    Job.status == JobStatus.queued,
                    (Job.enqueued_at.is_(None)) | (Job.enqueued_at < now - redispatch_after),
                    # Jobs waiting behind an earlier turn are not lost, only not yet due.
                    lifecycle.is_next_in_conversation(),
                )
                .order_by(Job.created_at)
                .limit(500)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        for job in stale:
            lifecycle.dispatch(session, job)
        sent = len(stale)
    for job in stale:
        with log_context(job_id=job.id):
            log.info("queued with no broker message seen; sent again")
    if expired or sent:
        log.info(
            "reconciled: %d expired running jobs, %d queued jobs sent again", len(expired), sent
        )
    return len(expired), sent
