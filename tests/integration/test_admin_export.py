"""Transcript export (route and `parley export`) and the admin stats, against real PostgreSQL."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text, update

from app.admin import export
from app.admin.filters import make_filter
from app.auth.service import ensure_tenant
from app.db import session_scope
from app.dev.stack import Stack
from app.models import Job
from app.redis import WORKERS_KEY, report_worker_alive, workers_alive
from tests.integration.helpers import Api
from tests.integration.test_admin_search import seed_conversation

pytestmark = pytest.mark.integration


def _export(api: Api, **params: Any) -> list[dict[str, Any]]:
    answer = api.request("GET", "/v1/admin/export", api.admin_key, params=params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in answer.text.splitlines()]


def _seed_two_tenants() -> tuple[str, str, str]:
    now = datetime.now(UTC)
    first = seed_conversation(
        "acme",
        [("How do I reset my password?", "Open the settings page.", "succeeded")],
        system_prompt="You are a support agent.",
        created_at=now - timedelta(days=3),
    )
    second = seed_conversation(
        "acme",
        [("Is shipping free?", "Above 50 euros.", "succeeded"), ("Thanks", None, "failed")],
        created_at=now - timedelta(days=1),
    )
    chinese = seed_conversation("globex", [("请解释实现多轮对话的原理", "好的", "succeeded")])
    return first, second, chinese


def test_export_is_ndjson_in_the_messages_shape(api_no_workers: Api) -> None:
    api = api_no_workers
    first, second, chinese = _seed_two_tenants()
    lines = _export(api)
    assert [line["conversation_id"] for line in lines] == [first, second, chinese]
    assert set(lines[0]) == {"conversation_id", "tenant", "created_at", "messages"}
    assert lines[0]["tenant"] == "acme"
    assert [(m["role"], m["content"]) for m in lines[0]["messages"]] == [
        ("system", "You are a support agent."),
        ("user", "How do I reset my password?"),
        ("assistant", "Open the settings page."),
    ]
    assert all(set(m) == {"role", "content", "created_at"} for m in lines[1]["messages"])
    assert [m["role"] for m in lines[1]["messages"]] == ["user", "assistant", "user"]
    assert lines[2]["messages"][0]["content"] == "请解释实现多轮对话的原理"


def test_export_filters(api_no_workers: Api) -> None:
    api = api_no_workers
    first, second, chinese = _seed_two_tenants()
    ids = lambda **p: [line["conversation_id"] for line in _export(api, **p)]  # noqa: E731
    assert ids(tenant="acme") == [first, second]
    assert ids(q="passwords") == [first]
    assert ids(q="多轮对话") == [chinese]
    assert ids(since=(datetime.now(UTC) - timedelta(days=2)).isoformat()) == [second, chinese]
    assert ids(tenant="acme", status="failed") == [second]
    assert ids(tenant="nobody") == []
    answer = api.request("GET", "/v1/admin/export", api.admin_key, params={"since": "soon"})
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"


def test_parley_export_writes_jsonl(api_no_workers: Api, tmp_path: Path) -> None:
    first, second, _ = _seed_two_tenants()
    out = tmp_path / "acme.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "export", "--tenant", "acme", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["conversation_id"] for line in lines] == [first, second]
    assert lines[0]["messages"][0]["role"] == "system"
    assert "2 conversations" in done.stdout + done.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "app.cli", "export", "--since", "2026-02-01",
         "--until", "2026-01-01", "-o", str(tmp_path / "none.jsonl")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "since" in refused.stderr
    unsearchable = subprocess.run(
        [sys.executable, "-m", "app.cli", "export", "--q", "or", "-o", str(tmp_path / "or.jsonl")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unsearchable.returncode == 2
    assert "nothing to search for" in unsearchable.stderr


def test_export_pages_keep_conversations_whole_and_in_order(api_no_workers: Api) -> None:
    """Pages of a few rows: conversations span pages and come out whole, oldest first, the
    same records as in one page; a conversation without messages is a record too."""
    first, second, chinese = _seed_two_tenants()
    now = datetime.now(UTC)
    long = seed_conversation(
        "acme",
        [(f"question {n}", f"answer {n}", "succeeded") for n in range(7)],
        created_at=now - timedelta(days=2),
    )
    empty = seed_conversation("acme", [], created_at=now - timedelta(days=1, hours=1))
    whole = _export(api_no_workers)
    assert [r["conversation_id"] for r in whole] == [first, long, empty, second, chinese]
    assert [m["content"] for m in whole[1]["messages"][:3]] == [
        "question 0",
        "answer 0",
        "question 1",
    ]
    assert whole[2]["messages"] == []
    filters = make_filter()
    for rows in (1, 2, 3, 5, 14, 15):
        records, after, pages = export.Records(), None, 0
        got: list[dict[str, Any]] = []
        while True:
            page = export.read_page_alone(filters, after, rows=rows)
            assert len(page.rows) <= rows
            got += records.add(page.rows)
            pages += 1
            if page.next is None:
                got += records.finish()
                break
            after = page.next
        assert got == whole, rows
        assert pages >= 22 // rows  # 22 rows: a conversation without messages is one


def _bulk_export(conversations: int, message_chars: int) -> None:
    """`conversations` conversations of 10 messages of about `message_chars` characters."""
    with session_scope() as session:
        ensure_tenant(session, tenant_id="bulk")
        for statement in (
            "INSERT INTO conversations (id, tenant_id, metadata, turn_count, message_count,"
            " created_at) SELECT 'conv_bulk' || lpad(g::text, 6, '0'), 'bulk', '{}', 5, 10,"
            " now() - interval '1 day' + g * interval '1 ms' FROM generate_series(1, :n) g",
            "INSERT INTO jobs (id, tenant_id, conversation_id, turn, status, generation,"
            " metadata, attempts, cancel_requested)"
            " SELECT 'job_bulk' || g || '_' || t, 'bulk', 'conv_bulk' || lpad(g::text, 6, '0'),"
            " t, 'succeeded', '{\"max_new_tokens\": 16}', '{}', 1, false"
            " FROM generate_series(1, :n) g, generate_series(1, 5) t",
            "INSERT INTO messages (id, conversation_id, job_id, seq, role, content)"
            " SELECT 'msg_bulk' || g || '_' || s, 'conv_bulk' || lpad(g::text, 6, '0'),"
            " 'job_bulk' || g || '_' || ((s + 1) / 2), s,"
            " CASE WHEN s % 2 = 1 THEN 'user' ELSE 'assistant' END,"
            " repeat('lorem ipsum dolor sit amet ', :chars / 27)"
            " FROM generate_series(1, :n) g, generate_series(1, 10) s",
        ):
            session.execute(text(statement), {"n": conversations, "chars": message_chars})


def test_a_paused_export_holds_no_connection(api_no_workers: Api, database_url: str) -> None:
    """A reader that stops mid-download holds no connection and no transaction of the API: each
    page is read in a short transaction of its own, under a session slot, and the API waits
    for the reader holding nothing. The download then goes on to the end, every conversation
    once, in order."""
    _bulk_export(1500, 1000)  # 15 MB of NDJSON, over 2 pages of rows
    app_name = "parley-export-test"
    observer = create_engine(database_url)
    states_sql = text(
        "SELECT state FROM pg_stat_activity WHERE application_name = :name AND datname ="
        " current_database()"
    )
    # A small receive buffer: the sockets hold a few MB at most, not the whole export.
    small_buffer = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)]
    with Stack({"PGAPPNAME": app_name}) as stack:
        stack.api()
        assert stack.base_url is not None and stack.wait_ready("/livez", timeout=60)
        with (
            httpx.Client(
                base_url=stack.base_url,
                transport=httpx.HTTPTransport(socket_options=small_buffer),
                timeout=60,
            ) as client,
            client.stream(
                "GET", "/v1/admin/export", headers=api_no_workers.auth(api_no_workers.admin_key)
            ) as answer,
            observer.connect() as connection,
        ):
            assert answer.status_code == 200
            chunks = answer.iter_bytes()
            body = [next(chunks)]
            time.sleep(0.5)  # the API writes until the sockets are full, then waits
            seen: list[str] = []
            for _ in range(10):
                seen += connection.execute(states_sql, {"name": app_name}).scalars().all()
                connection.rollback()
                time.sleep(0.1)
            body += list(chunks)
    observer.dispose()
    assert seen, "the API's connections are not in pg_stat_activity"
    assert set(seen) == {"idle"}, seen
    lines = [json.loads(line) for line in b"".join(body).splitlines()]
    assert [r["conversation_id"] for r in lines] == [f"conv_bulk{n:06}" for n in range(1, 1501)]
    assert all(len(r["messages"]) == 10 for r in lines)


def test_stats_per_status_tenant_and_percentiles(
    api_no_workers: Api, redis_client: redis.Redis
) -> None:
    api = api_no_workers
    now = datetime.now(UTC)
    conversations = [
        seed_conversation("acme", [("a", "b", "succeeded")]),
        seed_conversation("acme", [("c", "d", "succeeded")]),
        seed_conversation("acme", [("e", None, "failed")]),
        seed_conversation("globex", [("f", None, "running")]),
        seed_conversation("globex", [("g", None, "cancelled")]),
        seed_conversation("globex", [("h", None, "queued")]),
    ]
    # Queue waits of 1, 2, 3 (acme) and 10, 20 s (globex); run times of 4, 8, 12 s (acme).
    timings = [(1, 4), (2, 8), (3, 12), (10, None), (20, None), (None, None)]
    with session_scope() as session:
        for conversation, (wait, run) in zip(conversations, timings, strict=True):
            created = now - timedelta(minutes=30)
            started = created + timedelta(seconds=wait) if wait is not None else None
            finished = started + timedelta(seconds=run) if started and run else None
            session.execute(
                update(Job)
                .where(Job.conversation_id == conversation)
                .values(created_at=created, started_at=started, finished_at=finished)
            )
        # Outside the hour: counted per status, not in the percentiles.
        old = seed_conversation("acme", [("z", "y", "succeeded")])
        session.execute(
            update(Job)
            .where(Job.conversation_id == old)
            .values(
                created_at=now - timedelta(hours=3),
                started_at=now - timedelta(hours=3) + timedelta(seconds=500),
                finished_at=now - timedelta(hours=2),
            )
        )
    # Two more workers report in (the session's real ones may be alive too, or not).
    alive_before = workers_alive(redis_client)
    for name in ("stats-a", "stats-b"):
        report_worker_alive(redis_client, name)
    try:
        answer = api.request("GET", "/v1/admin/stats", api.admin_key)
    finally:
        redis_client.zrem(WORKERS_KEY, "stats-a", "stats-b")
    assert answer.status_code == 200, answer.text
    stats = answer.json()
    total, tenants = stats["total"], {t["tenant"]: t for t in stats["tenants"]}
    assert total["jobs"] == {
        "queued": 1, "running": 1, "succeeded": 3, "failed": 1, "cancelled": 1
    }  # fmt: skip
    assert total["queue_depth"] == 1
    assert tenants["acme"]["jobs"]["succeeded"] == 3
    assert tenants["globex"]["queue_depth"] == 1
    assert tenants["acme"]["queue_wait_seconds"] == {"p50": 2.0, "p95": 2.9, "count": 3}
    assert tenants["acme"]["run_time_seconds"] == {"p50": 8.0, "p95": 11.6, "count": 3}
    assert tenants["globex"]["queue_wait_seconds"] == {"p50": 15.0, "p95": 19.5, "count": 2}
    assert tenants["globex"]["run_time_seconds"] == {"p50": None, "p95": None, "count": 0}
    assert total["queue_wait_seconds"] == {"p50": 3.0, "p95": 18.0, "count": 5}
    assert stats["window_seconds"] == 3600
    assert stats["workers_alive"] == alive_before + 2
    assert isinstance(stats["broker_queue_length"], int)
