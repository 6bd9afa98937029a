"""Transcript export: one conversation a line, in the OpenAI messages shape, streamed.

The rows come through a server-side cursor in the order they are written (conversation by
conversation), so memory holds one batch of rows and one conversation whatever the size of
the export. Used by `GET /v1/admin/export` and by `parley export`.

The conversation's system prompt, when it has one, is its first message, with role "system"
and the conversation's creation time: fine-tuning tools expect it there. Every stored message
follows, failed and cancelled turns included: the export is the transcript, as stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.admin.filters import TranscriptFilter, apply_filter
from app.models import Conversation, Message

# Rows fetched from the server-side cursor at a time.
FETCH_ROWS = 2000
# Lines are sent in chunks of about this size: one write per line would cost more than it.
CHUNK_BYTES = 64 * 1024


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def count_conversations(session: Session, filters: TranscriptFilter) -> int:
    query, _ = apply_filter(session, select(func.count()).select_from(Conversation), filters)
    return int(session.execute(query).scalar_one())


def iter_conversations(session: Session, filters: TranscriptFilter) -> Iterator[dict[str, Any]]:
    """Each matching conversation, oldest first, as its export record."""
    columns = select(
        Conversation.id,
        Conversation.tenant_id,
        Conversation.created_at,
        Conversation.system_prompt,
        Message.role,
        Message.content,
        Message.created_at,
    ).outerjoin(Message, Message.conversation_id == Conversation.id)
    query, _ = apply_filter(session, columns, filters)
    rows = session.execute(
        query.order_by(Conversation.created_at, Conversation.id, Message.seq),
        execution_options={"yield_per": FETCH_ROWS},
    )
    record: dict[str, Any] | None = None
    for conv_id, tenant, created_at, system_prompt, role, content, message_at in rows:
        if record is None or record["conversation_id"] != conv_id:
            if record is not None:
                yield record
            messages = []
            if system_prompt is not None:
                messages.append(
                    {"role": "system", "content": system_prompt, "created_at": _time(created_at)}
                )
            record = {
                "conversation_id": conv_id,
                "tenant": tenant,
                "created_at": _time(created_at),
                "messages": messages,
            }
        if role is not None:
            record["messages"].append(
                {"role": role, "content": content, "created_at": _time(message_at)}
            )
    if record is not None:
        yield record


def to_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def ndjson_chunks(records: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """The records as NDJSON, joined into chunks of about CHUNK_BYTES."""
    buffer: list[bytes] = []
    size = 0
    for record in records:
        line = to_line(record)
        buffer.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)
