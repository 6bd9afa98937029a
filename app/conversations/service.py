"""Reading and deleting a tenant's conversations (the transcript)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, tuple_
from sqlalchemy.orm import Session

from app.conversations.schemas import ConversationOut, MessageOut
from app.errors import not_found
from app.ids import plausible_id
from app.jobs import lifecycle
from app.models import UNFINISHED, Conversation, Job, JobStatus, Message
from app.pagination import decode_cursor, split_page


def get_conversation(
    session: Session, *, tenant_id: str | None, conversation_id: str
) -> Conversation:
    """The conversation, if it exists and (unless `tenant_id` is None, for admins) is the
    tenant's: another tenant's is answered like one that does not exist."""
    conversation = (
        session.get(Conversation, conversation_id) if plausible_id(conversation_id) else None
    )
    if conversation is None or (tenant_id is not None and conversation.tenant_id != tenant_id):
        raise not_found("Conversation")
    return conversation


def to_out(conversation: Conversation) -> ConversationOut:
    return ConversationOut(
        id=conversation.id,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        system_prompt=conversation.system_prompt,
        metadata=conversation.metadata_,
        message_count=conversation.message_count,
    )


def list_conversations(
    session: Session, *, tenant_id: str, limit: int, cursor: str | None
) -> tuple[list[Conversation], str | None]:
    """Newest first, keyed on (created_at, id)."""
    query = select(Conversation).where(Conversation.tenant_id == tenant_id)
    after = decode_cursor(cursor, (datetime, str))
    if after is not None:
        query = query.where(
            tuple_(Conversation.created_at, Conversation.id) < tuple_(after[0], after[1])
        )
    rows = session.execute(
        query.order_by(Conversation.created_at.desc(), Conversation.id.desc()).limit(limit + 1)
    ).scalars()
    return split_page(list(rows), limit, lambda c: [c.created_at.isoformat(), c.id])


def list_messages(
    session: Session, *, conversation_id: str, limit: int, cursor: str | None
) -> tuple[list[MessageOut], str | None]:
    """Oldest first, keyed on seq."""
    query = select(Message).where(Message.conversation_id == conversation_id)
    after = decode_cursor(cursor, (int,))
    if after is not None:
        query = query.where(Message.seq > after[0])
    rows, next_cursor = split_page(
        list(session.execute(query.order_by(Message.seq).limit(limit + 1)).scalars()),
        limit,
        lambda m: [m.seq],
    )
    return [
        MessageOut(
            id=m.id,
            seq=m.seq,
            role=m.role,
            content=m.content,
            job_id=m.job_id,
            created_at=m.created_at,
        )
        for m in rows
    ], next_cursor


def delete_conversation(session: Session, *, conversation: Conversation) -> list[str]:
    """Cancel the unfinished jobs, then delete everything. Returns the ids of jobs that were
    running, whose workers must be told to stop."""
    lifecycle.lock_conversation(session, conversation.id)
    unfinished = list(
        session.execute(
            select(Job)
            .where(Job.conversation_id == conversation.id, Job.status.in_(UNFINISHED))
            .with_for_update()
        ).scalars()
    )
    running = [job.id for job in unfinished if job.status == JobStatus.running]
    sent = any(job.status == JobStatus.queued and job.enqueued_at for job in unfinished)
    for job in unfinished:
        job.cancel_requested = True
        job.status = JobStatus.cancelled
    session.flush()
    # Messages, jobs and idempotency records go with the conversation (ON DELETE CASCADE).
    session.execute(delete(Conversation).where(Conversation.id == conversation.id))
    if sent:
        # Its sent jobs left the broker's queue unstarted: room for the tenant's held ones.
        lifecycle.release_held(session, tenant_id=conversation.tenant_id)
    return running
