"""Transcript retention: old conversations go with their messages, jobs and cached context;
run as a function against the real database, and by `parley beat` through a real worker."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from app.config import Settings, get_settings
from app.db import session_scope
from app.dev.stack import Stack
from app.models import Conversation, Job, Message
from tests.integration.test_admin_search import seed_conversation
from worker.io_worker.retention import enforce_retention

pytestmark = pytest.mark.integration


def _with(**changes: object) -> Settings:
    return get_settings().model_copy(update=changes)


def _exists(conversation_id: str) -> bool:
    with session_scope() as session:
        return session.get(Conversation, conversation_id) is not None


def _rows(conversation_id: str) -> tuple[int, int]:
    with session_scope() as session:
        messages = session.execute(
            select(func.count())
            .select_from(Message)
            .where(Message.conversation_id == conversation_id)
        ).scalar_one()
        jobs = session.execute(
            select(func.count()).select_from(Job).where(Job.conversation_id == conversation_id)
        ).scalar_one()
    return messages, jobs


def _seed(age_days: float, tenant: str = "acme") -> str:
    updated = datetime.now(UTC) - timedelta(days=age_days)
    return seed_conversation(
        tenant,
        [("hello", "hi", "succeeded"), ("again", None, "failed")],
        created_at=updated - timedelta(days=1),
        updated_at=updated,
    )


def test_old_conversations_are_deleted_with_everything(
    database_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    old = [_seed(40), _seed(31, "globex"), _seed(100)]
    recent = [_seed(29), _seed(0)]
    for conversation_id in old + recent:
        redis_client.set(f"parley:context:{conversation_id}", "{}")
    caplog.set_level(logging.INFO, logger="parley.retention")
    report = enforce_retention(_with(transcript_retention_days=30), batch_size=2)
    assert (report.conversations, report.messages, report.jobs) == (3, 9, 6)
    assert report.per_tenant == {"acme": 2, "globex": 1}
    for conversation_id in old:
        assert not _exists(conversation_id)
        assert _rows(conversation_id) == (0, 0)
        assert not redis_client.exists(f"parley:context:{conversation_id}")
    for conversation_id in recent:
        assert _exists(conversation_id)
        assert _rows(conversation_id) == (3, 2)
        assert redis_client.exists(f"parley:context:{conversation_id}")
    assert "deleted 3 conversations (9 messages, 6 jobs)" in caplog.text
    assert "acme=2, globex=1" in caplog.text
    # A second run finds nothing more.
    assert enforce_retention(_with(transcript_retention_days=30)).conversations == 0


def test_unset_retention_keeps_everything(database_url: str) -> None:
    ancient = _seed(10_000)
    report = enforce_retention(_with(transcript_retention_days=None))
    assert report.cutoff is None
    assert report.conversations == 0
    assert _exists(ancient)


def test_beat_schedules_retention_and_the_io_worker_runs_it(
    database_url: str, tmp_path: Path, io_workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    old, recent = _seed(40), _seed(1)
    settings = {"TRANSCRIPT_RETENTION_DAYS": "30", "RETENTION_INTERVAL_SECONDS": "1"}
    worker = io_workers(**settings)
    with Stack(settings) as stack:
        beat = stack.beat(tmp_path)
        deadline = time.monotonic() + 120
        while _exists(old):
            assert time.monotonic() < deadline, "retention did not run"
            assert worker.poll() is None and beat.poll() is None, "the worker or beat exited"
            time.sleep(0.5)
        assert _exists(recent)
        assert any(tmp_path.iterdir())  # beat keeps its schedule's state there
