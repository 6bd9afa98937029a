"""`parley export`: the admin export written to a JSONL file, with a progress bar.

Reads the database directly, through the same service as `GET /v1/admin/export`. The total of
the progress bar is counted first; conversations created while the export runs may make it
end past that total.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from app.admin import export
from app.admin.filters import TranscriptFilter, make_filter
from app.admin.search import parse_query
from app.db import session_scope
from app.errors import ProblemError
from app.models import JobStatus


class BadFilter(ValueError):
    pass


def _time(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise BadFilter(f"--{name} is not a date or time such as 2026-01-31T12:00:00Z") from None


def parse_filter(
    *,
    tenant: str | None,
    q: str | None,
    since: str | None,
    until: str | None,
    status: str | None,
) -> TranscriptFilter:
    if status is not None and status not in set(JobStatus):
        raise BadFilter(f"--status is one of {', '.join(JobStatus)}")
    try:
        filters = make_filter(
            tenant=tenant,
            q=q,
            since=_time("since", since),
            until=_time("until", until),
            status=status,
        )
        if filters.q is not None:
            # A query no index could serve is refused here as in the API.
            with session_scope() as session:
                parse_query(session, filters.q)
    except ProblemError as problem:
        raise BadFilter(problem.detail) from None
    return filters


def export_to_file(filters: TranscriptFilter, output: Path) -> tuple[int, int]:
    """Writes the export to `output`; returns (conversations, messages)."""
    console = Console(stderr=True)
    conversations = messages = 0
    with session_scope() as session:
        total = export.count_conversations(session, filters)
    columns = (
        TextColumn("exporting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("conversations"),
        TimeRemainingColumn(),
    )
    with (
        output.open("wb") as file,
        Progress(*columns, console=console, disable=not sys.stderr.isatty()) as progress,
    ):
        task = progress.add_task("export", total=total)
        # Page by page, each its own short transaction (app.admin.export).
        for record in export.iter_conversations(filters):
            file.write(export.to_line(record))
            conversations += 1
            messages += len(record["messages"])
            progress.advance(task)
    console.print(f"exported {conversations} conversations ({messages} messages) to {output}")
    return conversations, messages
