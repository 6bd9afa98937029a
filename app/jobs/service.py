"""Submitting, reading and cancelling turns (the API's side of a job)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ProblemError, not_found
from app.ids import new_id, plausible_id
from app.jobs import fair_share, lifecycle
from app.jobs.schemas import JobCreate
from app.models import UNFINISHED, Conversation, Job, JobStatus, Message, user_seq
from app.models.base import utcnow
from app.schemas import GenerationSettings


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


def _check_tenant_capacity(session: Session, *, tenant_id: str, settings: Settings) -> None:
    # Counting stops at the limit, so a tenant with a deep queue costs no more per submit.
    limit = settings.max_unfinished_jobs_per_tenant
    unfinished = session.execute(
        select(func.count()).select_from(
            select(Job.id)
            .where(Job.tenant_id == tenant_id, Job.status.in_(UNFINISHED))
            .limit(limit)
            .subquery()
        )
    ).scalar_one()
    if unfinished >= limit:
        raise ProblemError(
            429,
            f"This tenant has {limit} unfinished jobs, the most allowed; "
            "retry when some have ended.",
            headers={"Retry-After": "5"},
        )


def submit_turn(session: Session, *, tenant_id: str, request: JobCreate, settings: Settings) -> Job:
    """Store the user's message and its job; dispatch it if it is its conversation's next."""
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
    _check_tenant_capacity(session, tenant_id=tenant_id, settings=settings)
    now = utcnow()
    if request.conversation_id is not None:
        conversation = (
            lifecycle.lock_conversation(session, request.conversation_id, tenant_id=tenant_id)
            if plausible_id(request.conversation_id)
            else None
        )
        if conversation is None or conversation.tenant_id != tenant_id:
            raise not_found("Conversation")
    else:
        conversation = Conversation(
            id=new_id("conv"),
            tenant_id=tenant_id,
            system_prompt=request.system_prompt,
            metadata_=dict(request.metadata),
            turn_count=0,
            message_count=0,
            created_at=now,
        )
        session.add(conversation)
    conversation.turn_count += 1
    conversation.message_count += 1
    conversation.updated_at = now
    turn = conversation.turn_count
    # Decided before the insert, so that the job is written once, already dispatched.
    is_next = turn == 1 or not lifecycle.has_earlier_unfinished(
        session, conversation_id=conversation.id, turn=turn
    )
    send = is_next and fair_share.has_room(session, tenant_id)
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        conversation_id=conversation.id,
        turn=turn,
        status=JobStatus.queued,
        generation=generation,
        metadata_=dict(request.metadata),
        webhook_url=request.webhook_url,
        attempts=0,
        cancel_requested=False,
        created_at=now,
    )
    if is_next:
        job.ready_at = now
    session.add(job)
    if send:
        lifecycle.dispatch(session, job)
    session.flush()
    session.add(
        Message(
            id=new_id("msg"),
            conversation_id=conversation.id,
            job_id=job.id,
            seq=user_seq(turn),
            role="user",
            content=request.message,
            created_at=now,
        )
    )
    session.flush()
    return job


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
