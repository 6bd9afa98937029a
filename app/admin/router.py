"""`/v1/admin`: transcripts across tenants (search, read, export) and operational stats.

Every route needs an admin key: a client key gets 403, no key 401.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.admin import export, service
from app.admin.filters import MAX_QUERY_CHARS, TranscriptFilter, make_filter
from app.admin.schemas import AdminConversationOut, ConversationSummary, JobStatusName, StatsOut
from app.admin.stats import broker_queue_length, collect_stats
from app.deps import AdminKey, SessionDep, SettingsDep
from app.pagination import CursorQuery, LimitQuery, Page
from app.redis import get_redis, workers_alive
from app.schemas import Rfc3339
from celeryconfig import TURNS_QUEUE

router = APIRouter(prefix="/v1/admin", tags=["admin"])

TenantQuery = Annotated[
    str | None, Query(max_length=64, description="Only this tenant's conversations.")
]
SearchText = Annotated[
    str | None,
    Query(
        max_length=MAX_QUERY_CHARS,
        description="Search message content: English words (any word form), quoted phrases, "
        "or text in any script (Chinese, Japanese, Thai... are matched as substrings).",
    ),
]
SinceQuery = Annotated[
    Rfc3339 | None, Query(description="Conversations created at or after this time.")
]
UntilQuery = Annotated[Rfc3339 | None, Query(description="Conversations created before this time.")]
StatusQuery = Annotated[
    JobStatusName | None, Query(description="The status of the conversation's last job.")
]


def transcript_filter(
    tenant: TenantQuery = None,
    q: SearchText = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    status: StatusQuery = None,
) -> TranscriptFilter:
    return make_filter(tenant=tenant, q=q, since=since, until=until, status=status)


@router.get("/conversations", response_model=Page[ConversationSummary])
def list_conversations(
    _: AdminKey,
    session: SessionDep,
    tenant: TenantQuery = None,
    q: SearchText = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    status: StatusQuery = None,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> Page[ConversationSummary]:
    """Every tenant's conversations, newest first, filtered and searched."""
    filters = transcript_filter(tenant, q, since, until, status)
    data, next_cursor = service.list_conversations(
        session, filters=filters, limit=limit, cursor=cursor
    )
    return Page(data=data, next_cursor=next_cursor)


@router.get("/conversations/{conversation_id}", response_model=AdminConversationOut)
def read_conversation(
    conversation_id: str, _: AdminKey, session: SessionDep
) -> AdminConversationOut:
    """Any tenant's conversation, with all its messages and jobs."""
    return service.get_conversation(session, conversation_id=conversation_id)


async def _read_page(
    slots: asyncio.Semaphore, filters: TranscriptFilter, after: export.Position | None
) -> export.Page:
    # Under a session slot, like every use of a connection by a request (app.deps), and in
    # one thread call that gives the connection back: none is held while the client reads.
    async with slots:
        return await run_in_threadpool(export.read_page_alone, filters, after)


def _encode(records: export.Records, page: export.Page) -> list[bytes]:
    done = records.add(page.rows) + (records.finish() if page.next is None else [])
    return list(export.ndjson_chunks(done))


async def _stream(
    slots: asyncio.Semaphore, filters: TranscriptFilter, page: export.Page
) -> AsyncIterator[bytes]:
    records = export.Records()
    while True:
        for chunk in await run_in_threadpool(_encode, records, page):
            yield chunk
        if page.next is None:
            return
        page = await _read_page(slots, filters, page.next)


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def export_transcripts(
    request: Request,
    _: AdminKey,
    tenant: TenantQuery = None,
    q: SearchText = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    status: StatusQuery = None,
) -> StreamingResponse:
    """NDJSON, one conversation a line, oldest first:
    `{"conversation_id", "tenant", "created_at", "messages": [{"role", "content", "created_at"}]}`.
    The system prompt, if any, is the first message (role "system")."""
    slots = request.app.state.session_slots
    # The filters checked and the first page read now, while an error (a refused `q`, the
    # database away) can still be a problem document, not a cut-off stream.
    filters = transcript_filter(tenant, q, since, until, status)
    first = await _read_page(slots, filters, None)
    return StreamingResponse(
        _stream(slots, filters, first),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="transcripts.jsonl"'},
    )


@router.get("/stats", response_model=StatsOut)
def stats(_: AdminKey, session: SessionDep, settings: SettingsDep) -> StatsOut:
    """Jobs per status and queue depth now; p50/p95 queue wait and run time over the last
    hour; per tenant and in total."""
    return collect_stats(
        session,
        workers_alive=workers_alive(get_redis()),
        broker_queue_length=broker_queue_length(settings.celery_broker_url, TURNS_QUEUE),
    )
