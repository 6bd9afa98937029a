"""Transcript retention: conversations last updated more than TRANSCRIPT_RETENTION_DAYS ago
are deleted with everything that hangs off them.

Run by the periodic task `parley.enforce_retention` (worker/io_worker/tasks.py). Deletes in
batches, each its own transaction, so that a large first run neither holds locks for long
nor builds one huge transaction; conversations locked by a turn in progress are skipped
(SKIP LOCKED) and taken by a later run.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from sqlalchemy import delete, func, select

from app.config import Settings
from app.context.store import ContextStore
from app.db import session_scope
from app.models import Conversation, Job, JobStatus, Message
from app.models.base import utcnow
from app.redis import announce_job_ended, get_redis, request_cancel

log = logging.getLogger("parley.retention")

BATCH_SIZE = 500


@dataclass
class RetentionReport:
    # None: no retention is configured, nothing was looked at.
    cutoff: datetime | None
    conversations: int = 0
    messages: int = 0
    jobs: int = 0
    per_tenant: dict[str, int] = field(default_factory=dict)


def _delete_batch(
    cutoff: datetime, batch_size: int
) -> tuple[list[tuple[str, str]], int, int, list[str]]:
    """One transaction: (conversation ids and tenants, messages, jobs, running job ids)."""
    with session_scope() as session:
        rows = [
            (conversation_id, tenant)
            for conversation_id, tenant in session.execute(
                select(Conversation.id, Conversation.tenant_id)
                .where(Conversation.updated_at < cutoff)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).all()
        ]
        if not rows:
            return [], 0, 0, []
        ids = [conversation_id for conversation_id, _ in rows]
        messages = session.execute(
            select(func.count()).select_from(Message).where(Message.conversation_id.in_(ids))
        ).scalar_one()
        jobs = session.execute(select(Job.id, Job.status).where(Job.conversation_id.in_(ids))).all()
        # Messages, jobs, their webhook events and attempts, idempotency records: ON DELETE
        # CASCADE from the conversation.
        session.execute(delete(Conversation).where(Conversation.id.in_(ids)))
    running = [job_id for job_id, status in jobs if status == JobStatus.running]
    return rows, int(messages), len(jobs), running


def enforce_retention(
    settings: Settings, *, now: datetime | None = None, batch_size: int = BATCH_SIZE
) -> RetentionReport:
    """Delete what is older than the retention; logs and returns what was removed."""
    days = settings.transcript_retention_days
    if days is None:
        log.info("retention: TRANSCRIPT_RETENTION_DAYS is unset; transcripts are kept")
        return RetentionReport(cutoff=None)
    report = RetentionReport(cutoff=(now or utcnow()) - timedelta(days=days))
    assert report.cutoff is not None
    client = get_redis()
    store = ContextStore(
        client, ttl_seconds=settings.context_ttl_seconds, max_messages=settings.context_max_messages
    )
    tenants: collections.Counter[str] = collections.Counter()
    while True:
        rows, messages, jobs, running = _delete_batch(report.cutoff, batch_size)
        report.conversations += len(rows)
        report.messages += messages
        report.jobs += jobs
        tenants.update(tenant for _, tenant in rows)
        # After the commit. The cache would expire anyway (its TTL): a Redis outage must not
        # stop the deletions.
        with contextlib.suppress(redis.RedisError):
            for conversation_id, _ in rows:
                store.delete(conversation_id)
            for job_id in running:
                request_cancel(client, job_id)
                announce_job_ended(client, job_id)
        if len(rows) < batch_size:
            break
    report.per_tenant = dict(sorted(tenants.items()))
    log.info(
        "retention: deleted %d conversations (%d messages, %d jobs) last updated before %s "
        "(%d days); per tenant: %s",
        report.conversations,
        report.messages,
        report.jobs,
        report.cutoff.isoformat(),
        days,
        ", ".join(f"{tenant}={count}" for tenant, count in report.per_tenant.items()) or "none",
    )
    return report
