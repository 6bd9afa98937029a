"""A Job row as the API shows it (`JobOut`): read by the routes, the admin views and the
webhook payload alike. Reads only tables, schemas and the fair-share policy, so any domain
may use it."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import fair_share
from app.jobs.schemas import JobError, JobOut, Usage
from app.models import Job, JobStatus, Message, WebhookEvent
from app.schemas import ChatMessage
from app.webhooks.schemas import WebhookState


def queue_position(session: Session, job: Job) -> int:
    """Jobs that will run before this queued one, under the fair share between tenants."""
    if job.enqueued_at is not None:
        return fair_share.sent_position(session, job)
    return fair_share.held_position(session, job)


def webhook_state(session: Session, job: Job) -> WebhookState | None:
    """The Job's `webhook` field: pending until the job ends and its event is delivered."""
    if job.webhook_url is None:
        return None
    event = session.execute(
        select(WebhookEvent.status, WebhookEvent.attempts).where(WebhookEvent.job_id == job.id)
    ).first()
    if event is None:
        return WebhookState(url=job.webhook_url, status="pending", attempts=0)
    return WebhookState(url=job.webhook_url, status=event.status, attempts=event.attempts)


def to_job_out(session: Session, job: Job) -> JobOut:
    messages = {
        m.role: m
        for m in session.execute(select(Message).where(Message.job_id == job.id)).scalars()
    }
    reply = messages.get("assistant")
    status = JobStatus(job.status)
    return JobOut(
        id=job.id,
        conversation_id=job.conversation_id,
        status=status,
        message=ChatMessage(role="user", content=messages["user"].content),
        reply=ChatMessage(role="assistant", content=reply.content)
        if reply is not None and status == JobStatus.succeeded
        else None,
        error=JobError(code=job.error_code or "error", message=job.error_message or "")
        if status == JobStatus.failed
        else None,
        context_messages=job.context_messages,
        usage=Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens)
        if job.prompt_tokens is not None and job.completion_tokens is not None
        else None,
        queue_position=queue_position(session, job) if status == JobStatus.queued else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        webhook=webhook_state(session, job),
        metadata=job.metadata_,
    )
