"""The operator's view of transcripts: every tenant's conversations, searched and filtered."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, text, tuple_
from sqlalchemy.orm import Session

from app.admin.filters import TranscriptFilter, apply_filter, last_job_status
from app.admin.schemas import AdminConversationOut, ConversationSummary
from app.admin.search import snippets
from app.conversations import service as conversations
from app.conversations.schemas import MessageOut
from app.errors import not_found
from app.ids import plausible_id
from app.jobs.presenter import to_job_out
from app.models import Conversation, Job
from app.pagination import decode_cursor, split_page


def list_conversations(
    session: Session, *, filters: TranscriptFilter, limit: int, cursor: str | None
) -> tuple[list[ConversationSummary], str | None]:
    """Newest first, keyed on (created_at, id): a conversation's place never changes, and new
    ones go to the front, so paging on is stable while turns arrive."""
    # The plans here are index walks under a LIMIT: starting a parallel worker costs more
    # (tens of ms on a small machine) than it could save. For this transaction only.
    session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
    status = last_job_status().label("last_job_status")
    query, search = apply_filter(session, select(Conversation, status), filters)
    after = decode_cursor(cursor, (datetime, str))
    if after is not None:
        query = query.where(
            tuple_(Conversation.created_at, Conversation.id) < tuple_(after[0], after[1])
        )
    rows, next_cursor = split_page(
        list(
            session.execute(
                query.order_by(Conversation.created_at.desc(), Conversation.id.desc()).limit(
                    limit + 1
                )
            ).all()
        ),
        limit,
        lambda row: [row[0].created_at.isoformat(), row[0].id],
    )
    found = (
        snippets(session, query=search, conversation_ids=[row[0].id for row in rows])
        if search is not None
        else {}
    )
    return [
        ConversationSummary(
            id=conversation.id,
            tenant=conversation.tenant_id,
            created_at=conversation.created_at,
            updated_at=conversation.updated_at,
            message_count=conversation.message_count,
            last_job_status=last_status,
            snippet=found.get(conversation.id),
        )
        for conversation, last_status in rows
    ], next_cursor


def _all_messages(session: Session, conversation_id: str) -> list[MessageOut]:
    messages: list[MessageOut] = []
    cursor: str | None = None
    while True:
        page, cursor = conversations.list_messages(
            session, conversation_id=conversation_id, limit=200, cursor=cursor
        )
        messages += page
        if cursor is None:
            return messages


def get_conversation(session: Session, *, conversation_id: str) -> AdminConversationOut:
    """Any tenant's conversation with its whole transcript and every job, oldest first."""
    conversation = (
        session.get(Conversation, conversation_id) if plausible_id(conversation_id) else None
    )
    if conversation is None:
        raise not_found("Conversation")
    jobs = session.execute(
        select(Job).where(Job.conversation_id == conversation.id).order_by(Job.turn)
    ).scalars()
    return AdminConversationOut(
        **conversations.to_out(conversation).model_dump(),
        tenant=conversation.tenant_id,
        messages=_all_messages(session, conversation.id),
        jobs=[to_job_out(session, job) for job in jobs],
    )
