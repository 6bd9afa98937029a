"""The admin conversation list's own SQL, explained: the tests check that its plan uses the
search indexes, and benchmark B5 times it with and without them."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session

from app.admin.filters import make_filter
from app.admin.service import list_conversations


def explain_service_query(
    conn: Connection, tenant: str | None, q: str, *, analyze: bool
) -> tuple[float, str]:
    """The admin list's own SQL for (tenant, q), as the service builds it, explained:
    (execution time in ms, or 0 without analyze; the plan)."""
    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(conn, "before_cursor_execute", capture)
    try:
        with Session(bind=conn) as session:
            list_conversations(
                session, filters=make_filter(tenant=tenant, q=q), limit=50, cursor=None
            )
    finally:
        event.remove(conn, "before_cursor_execute", capture)
    statement, parameters = next((s, p) for s, p in statements if "EXISTS" in s)
    options = "ANALYZE, BUFFERS" if analyze else "COSTS"
    plan = "\n".join(
        row[0] for row in conn.exec_driver_sql(f"EXPLAIN ({options}) {statement}", parameters)
    )
    found = re.search(r"Execution Time: ([\d.]+) ms", plan)
    return (float(found.group(1)) if found else 0.0), plan
