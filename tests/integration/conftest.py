"""Fixtures for tests against the real services: a migrated database, clean Redis
databases, two Celery worker processes running the tiny model, and an API client."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import OperationalError

from app import queue
from app.config import get_settings, next_redis_database
from app.db import get_engine
from app.dev.stack import Stack
from app.redis import WORKERS_KEY, workers_alive
from celeryconfig import celery_config
from tests.integration.helpers import Api
from worker.turn_worker.reconciler import LOCK_KEY

# The session's turn workers write their logs here (read by test_logs.py; look here when a
# turn fails in a test).
WORKER_LOG = Path(__file__).resolve().parents[2] / ".parley" / "test" / "workers.log"

TABLES = (
    "tenants, api_keys, conversations, jobs, messages, idempotency_keys, "
    "webhook_events, webhook_attempts, webhook_secrets"
)


def _reset_schema(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(scope="session")
def database_url() -> str:
    from app.migrate import upgrade_database

    url = get_settings().database_url
    _reset_schema(url)
    upgrade_database(url)
    return url


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    client.flushdb()
    redis.Redis.from_url(next_redis_database(settings.redis_url)).flushdb()
    return client


def wait_for_workers(client: redis.Redis, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while workers_alive(client) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers did not report within {timeout}s")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def workers(
    database_url: str, redis_client: redis.Redis
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two real worker processes, as in a two-GPU deployment (reliability F11), each started
    as `parley worker --gpus cpu --no-restart` starts one, on one thread (they share this
    machine's cores). Their logs, at INFO, go to WORKER_LOG."""
    redis_client.delete(WORKERS_KEY)
    WORKER_LOG.unlink(missing_ok=True)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LOG_LEVEL": "INFO"}
    with Stack(env) as stack:
        procs = [
            stack.turn_worker(gpus="cpu", name=name, log=WORKER_LOG)
            for name in ("test-a", "test-b")
        ]
        wait_for_workers(redis_client, 2)
        yield procs


@pytest.fixture(scope="session")
def live_api(workers: list[subprocess.Popen[bytes]]) -> Iterator[str]:
    """The base URL of a real `parley api` process, for what the in-process client cannot
    show: a stream read while it is written, a reader that goes away."""
    with Stack() as stack:
        stack.api(log=WORKER_LOG.with_name("api.log"))
        if not stack.wait_ready("/livez", timeout=60):
            raise RuntimeError("parley api did not start")
        assert stack.base_url is not None
        yield stack.base_url


@pytest.fixture
def io_workers(
    database_url: str, redis_client: redis.Redis
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts real I/O worker processes (`start(**settings)`), as `parley io-worker` starts
    them; all are stopped after the test."""
    with Stack() as stack:

        def start(**settings: str) -> subprocess.Popen[bytes]:
            return stack.io_worker(name=f"test-io-{len(stack.procs)}", **settings)

        yield start


@pytest.fixture(scope="session")
def app_client(database_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as client:
        yield client


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    """Each test starts with empty tables and no cached context."""
    if "database_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("database_url")
    engine = create_engine(url)
    # A worker may still be ending an earlier test's turn: its row locks and TRUNCATE's table
    # locks can meet in a deadlock, which PostgreSQL breaks by failing one; try again.
    for attempt in range(5):
        try:
            with engine.begin() as connection:
                connection.execute(text(f"TRUNCATE {TABLES} CASCADE"))
            break
        except OperationalError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    engine.dispose()
    client = request.getfixturevalue("redis_client")
    for key in client.scan_iter("parley:context:*"):
        client.delete(key)


@pytest.fixture
def api(app_client: TestClient, workers: list[Any]) -> Api:
    """The API as a client sees it, with workers running, as the operator (admin key)."""
    return Api(app_client, admin_key=get_settings().parley_admin_key or "")


@pytest.fixture
def api_no_workers(app_client: TestClient) -> Api:
    return Api(app_client, admin_key=get_settings().parley_admin_key or "")


@pytest.fixture
def no_other_reconciler() -> Iterator[Callable[[], None]]:
    """Hold the reconciler's lock, so that the session's workers skip their rounds; the
    callable lets it go (for a test that reconciles itself)."""
    holder = get_engine().connect()
    holder.execute(select(func.pg_advisory_lock(LOCK_KEY)))
    holder.commit()
    held = [True]

    def let_go() -> None:
        if held[0]:
            holder.execute(select(func.pg_advisory_unlock(LOCK_KEY)))
            holder.commit()
            held[0] = False

    try:
        yield let_go
    finally:
        let_go()
        holder.close()


@pytest.fixture
def shares(monkeypatch: pytest.MonkeyPatch, no_other_reconciler: Callable[[], None]) -> Any:
    """Fair shares of 2, and no worker takes the jobs sent: their messages go to a broker no
    worker listens to (the session's workers, started by other tests, would run them). Nor
    does the reconciler run meanwhile (it would release held jobs by the shares of its own
    settings, not these tests'): `no_other_reconciler` holds its lock."""
    settings = get_settings()
    unwatched = settings.model_copy(
        update={"broker_url": settings.redis_url.rsplit("/", 1)[0] + "/9"}
    )
    client = Celery("parley-fair-share-tests")
    client.conf.update(celery_config(unwatched))
    monkeypatch.setattr(queue, "get_client", lambda: client)
    monkeypatch.setattr(settings, "fair_share_default", 2)
    monkeypatch.setattr(settings, "fair_share_tenants", {})
    return settings
