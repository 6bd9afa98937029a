from __future__ import annotations

import contextlib

import redis
from fastapi import APIRouter, Response

from app.context.store import ContextStore
from app.conversations import service
from app.conversations.schemas import ConversationOut, MessageOut
from app.deps import CurrentKey, SessionDep, SettingsDep
from app.pagination import CursorQuery, LimitQuery, Page
from app.redis import announce_job_ended, get_redis, request_cancel

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])


@router.get("", response_model=Page[ConversationOut])
def list_conversations(
    principal: CurrentKey, session: SessionDep, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> Page[ConversationOut]:
    """The tenant's conversations, newest first."""
    rows, next_cursor = service.list_conversations(
        session, tenant_id=principal.tenant_id, limit=limit, cursor=cursor
    )
    return Page(data=[service.to_out(c) for c in rows], next_cursor=next_cursor)


@router.get("/{conversation_id}", response_model=ConversationOut)
def read_conversation(
    conversation_id: str, principal: CurrentKey, session: SessionDep
) -> ConversationOut:
    return service.to_out(
        service.get_conversation(
            session, tenant_id=principal.readable_tenant, conversation_id=conversation_id
        )
    )


@router.get("/{conversation_id}/messages", response_model=Page[MessageOut])
def list_messages(
    conversation_id: str,
    principal: CurrentKey,
    session: SessionDep,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> Page[MessageOut]:
    """The transcript, oldest first. The system prompt is the conversation's, not listed here."""
    conversation = service.get_conversation(
        session, tenant_id=principal.readable_tenant, conversation_id=conversation_id
    )
    data, next_cursor = service.list_messages(
        session, conversation_id=conversation.id, limit=limit, cursor=cursor
    )
    return Page(data=data, next_cursor=next_cursor)


@router.delete("/{conversation_id}", status_code=204)
def delete_conversation(
    conversation_id: str, principal: CurrentKey, session: SessionDep, settings: SettingsDep
) -> Response:
    """Delete the conversation with its messages, jobs and cached context; unfinished jobs
    are cancelled first."""
    conversation = service.get_conversation(
        session, tenant_id=principal.readable_tenant, conversation_id=conversation_id
    )
    running = service.delete_conversation(session, conversation=conversation)
    session.commit()
    # Deleted in PostgreSQL; what follows only tidies Redis (the cached context expires
    # anyway, and a stopped worker's end finds no job to store).
    with contextlib.suppress(redis.RedisError):
        client = get_redis()
        for job_id in running:
            request_cancel(client, job_id)
            announce_job_ended(client, job_id)
        ContextStore(
            client,
            ttl_seconds=settings.context_ttl_seconds,
            max_messages=settings.context_max_messages,
        ).delete(conversation_id)
    return Response(status_code=204)
