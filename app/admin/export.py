"""Transcript export: one conversation a line, in the OpenAI messages shape, streamed.

Read in pages of PAGE_ROWS rows (a conversation's messages, conversation by conversation,
oldest first), each page a short transaction of its own that starts where the last one ended
(keyset pagination on the conversation's (created_at, id) and the message's seq): nothing is
held between pages, however slowly the export is read, and memory holds one page and one
conversation whatever the size of the export. A conversation may span pages; it is written
whole. Each page sees the database as it is then: a conversation created during the export
is in it if it sorts after the page being read, and a message appended to one is in it if
the export has not written that conversation yet. Used by `GET /v1/admin/export` (each page
under a session slot) and by `parley export`.

The conversation's system prompt, when it has one, is its first message, with role "system"
and the conversation's creation time: fine-tuning tools expect it there. Every stored message
follows, failed and cancelled turns included: the export is the transcript, as stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import Session

from app.admin.filters import TranscriptFilter, apply_filter
from app.db import session_scope
from app.models import Conversation, Message

# Rows (messages) of one page.
PAGE_ROWS = 2000
# Lines are sent in chunks of about this size: one write per line would cost more than it.
CHUNK_BYTES = 64 * 1024


class ExportRow(NamedTuple):
    conversation_id: str
    tenant: str
    created_at: datetime
    system_prompt: str | None
    # None for a conversation without messages.
    role: str | None
    content: str | None
    message_at: datetime | None
    seq: int | None


@dataclass(frozen=True)
class Position:
    """Where the next page starts: after message `seq` of this conversation, or (seq None,
    a conversation without messages) after the conversation."""

    created_at: datetime
    conversation_id: str
    seq: int | None


@dataclass(frozen=True)
class Page:
    rows: list[ExportRow]
    # None: this is the last page.
    next: Position | None


_COLUMNS = select(
    Conversation.id,
    Conversation.tenant_id,
    Conversation.created_at,
    Conversation.system_prompt,
    Message.role,
    Message.content,
    Message.created_at,
    Message.seq,
)


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def count_conversations(session: Session, filters: TranscriptFilter) -> int:
    query, _ = apply_filter(session, select(func.count()).select_from(Conversation), filters)
    return int(session.execute(query).scalar_one())


def _fetch(session: Session, query: Select[*tuple[Any, ...]], limit: int) -> list[ExportRow]:
    return [ExportRow(*row) for row in session.execute(query.limit(limit))]


def read_page(
    session: Session, filters: TranscriptFilter, after: Position | None, *, rows: int = PAGE_ROWS
) -> Page:
    """Up to `rows` rows of the export from `after` (None: from the start), in export order."""
    found: list[ExportRow] = []
    if after is not None and after.seq is not None:
        # The rest of the conversation the last page ended in (it matched the filters then).
        rest = (
            _COLUMNS.join(Message, Message.conversation_id == Conversation.id)
            .where(Conversation.id == after.conversation_id, Message.seq > after.seq)
            .order_by(Message.seq)
        )
        found = _fetch(session, rest, rows)
        if len(found) == rows:
            return Page(found, _position(found[-1]))
    query, _ = apply_filter(
        session, _COLUMNS.outerjoin(Message, Message.conversation_id == Conversation.id), filters
    )
    if after is not None:
        query = query.where(
            tuple_(Conversation.created_at, Conversation.id)
            > tuple_(after.created_at, after.conversation_id)
        )
    wanted = rows - len(found)
    more = _fetch(
        session, query.order_by(Conversation.created_at, Conversation.id, Message.seq), wanted
    )
    found += more
    return Page(found, _position(found[-1]) if len(more) == wanted else None)


def _position(row: ExportRow) -> Position:
    return Position(row.created_at, row.conversation_id, row.seq)


def read_page_alone(
    filters: TranscriptFilter, after: Position | None, *, rows: int = PAGE_ROWS
) -> Page:
    """A page read in a transaction (and a connection) of its own, given back at once."""
    with session_scope() as session:
        return read_page(session, filters, after, rows=rows)


class Records:
    """Export records from the rows of consecutive pages: each conversation once complete."""

    def __init__(self) -> None:
        self._record: dict[str, Any] | None = None

    def add(self, rows: list[ExportRow]) -> list[dict[str, Any]]:
        """The records these rows complete (the last one may go on in the next page)."""
        done: list[dict[str, Any]] = []
        for row in rows:
            record = self._record
            if record is None or record["conversation_id"] != row.conversation_id:
                if record is not None:
                    done.append(record)
                record = self._record = _new_record(row)
            if row.role is not None:
                assert row.message_at is not None
                record["messages"].append(
                    {"role": row.role, "content": row.content, "created_at": _time(row.message_at)}
                )
        return done

    def finish(self) -> list[dict[str, Any]]:
        """The last record, after the last page."""
        done, self._record = ([] if self._record is None else [self._record]), None
        return done


def _new_record(row: ExportRow) -> dict[str, Any]:
    messages = []
    if row.system_prompt is not None:
        messages.append(
            {"role": "system", "content": row.system_prompt, "created_at": _time(row.created_at)}
        )
    return {
        "conversation_id": row.conversation_id,
        "tenant": row.tenant,
        "created_at": _time(row.created_at),
        "messages": messages,
    }


def iter_conversations(filters: TranscriptFilter) -> Iterator[dict[str, Any]]:
    """Each matching conversation, oldest first, as its export record; page by page."""
    records = Records()
    page = read_page_alone(filters, None)
    while True:
        yield from records.add(page.rows)
        if page.next is None:
            yield from records.finish()
            return
        page = read_page_alone(filters, page.next)


def to_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def ndjson_chunks(records: Iterable[dict[str, Any]]) -> Iterator[bytes]:
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
