"""The filters shared by the admin list, the export route and `parley export`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVarTuple

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from app.admin.search import SearchQuery, message_matches, parse_query
from app.errors import ProblemError
from app.models import Conversation, Job, Message

MAX_QUERY_CHARS = 1000

Columns = TypeVarTuple("Columns")


@dataclass(frozen=True)
class TranscriptFilter:
    tenant: str | None = None
    # Free text, as typed; see app/admin/search.py.
    q: str | None = None
    # On the conversation's creation time: since <= created_at < until.
    since: datetime | None = None
    until: datetime | None = None
    # The status of the conversation's last job.
    status: str | None = None


def _utc(value: datetime | None) -> datetime | None:
    # A time without an offset is read as UTC, not as the database server's local time.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def make_filter(
    *,
    tenant: str | None = None,
    q: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    status: str | None = None,
) -> TranscriptFilter:
    """Checked filters: a problem (422) for values no conversation could match meaningfully."""
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and since > until:
        raise ProblemError(
            422,
            "since must not be after until.",
            errors=[{"loc": ["query", "since"], "msg": "after until"}],
        )
    for name, value in (("tenant", tenant), ("q", q)):
        if value is not None and "\x00" in value:
            raise ProblemError(
                422,
                f"{name} must not contain the NUL character.",
                errors=[{"loc": ["query", name], "msg": "NUL character"}],
            )
    q = q if q is not None and q.strip() else None
    if q is not None and len(q) > MAX_QUERY_CHARS:
        raise ProblemError(
            422,
            f"q may be at most {MAX_QUERY_CHARS} characters.",
            errors=[{"loc": ["query", "q"], "msg": "too long"}],
        )
    return TranscriptFilter(tenant=tenant, q=q, since=since, until=until, status=status)


def last_job_status() -> ColumnElement[str | None]:
    """The status of the conversation's latest turn (uq_jobs_conversation_turn serves it)."""
    return (
        select(Job.status)
        .where(Job.conversation_id == Conversation.id)
        .order_by(Job.turn.desc())
        .limit(1)
        .scalar_subquery()
    )


def apply_filter(
    session: Session, query: Select[*Columns], filters: TranscriptFilter
) -> tuple[Select[*Columns], SearchQuery | None]:
    """`query` over `Conversation` narrowed by `filters`; with the parsed search, if any."""
    if filters.tenant is not None:
        query = query.where(Conversation.tenant_id == filters.tenant)
    if filters.since is not None:
        query = query.where(Conversation.created_at >= filters.since)
    if filters.until is not None:
        query = query.where(Conversation.created_at < filters.until)
    if filters.status is not None:
        query = query.where(last_job_status() == filters.status)
    search = None
    if filters.q is not None:
        search = parse_query(session, filters.q)
        # Its own `messages`, also when the outer query joins them (the export).
        matching = (
            select(Message.id)
            .where(Message.conversation_id == Conversation.id, message_matches(search))
            .correlate_except(Message)
        )
        query = query.where(matching.exists())
    return query, search
