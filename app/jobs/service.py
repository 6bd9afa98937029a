"""Reading and cancelling turns (the API's side of a job; app.jobs.submission stores them)."""

from __future__ import annotations

import contextlib

import redis
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from sqlalchemy.orm import Session

from app.errors import ProblemError, not_found
from app.ids import plausible_id
from app.jobs import lifecycle, repository
from app.models import UNFINISHED, Job, JobStatus
from app.redis import announce_job_ended, get_redis, request_cancel


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
