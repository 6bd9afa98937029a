"""Test services: real PostgreSQL and Redis, and real Celery worker processes.

TEST_DATABASE_URL / TEST_REDIS_URL name servers to use (CI uses the machine's own);
without them an embedded PostgreSQL and Redis are started under .parley/test/. The
environment is set in pytest_configure, before any test module reads Parley's settings.
"""

from __future__ import annotations

import os
import secrets
from contextlib import ExitStack
from pathlib import Path

import pytest

from app.dev.stack import ensure_model

ROOT = Path(__file__).resolve().parents[1]
TEST_DIR = ROOT / ".parley" / "test"
_stack = ExitStack()


def _database_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    from app.dev.postgres import LocalPostgres

    postgres = _stack.enter_context(LocalPostgres(TEST_DIR / "postgres"))
    return postgres.create_database("parley_test", drop_existing=True)


def _redis_url() -> str:
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        return url
    from app.dev.redis_server import LocalRedis

    return _stack.enter_context(LocalRedis(TEST_DIR / "redis")).url


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    TEST_DIR.mkdir(parents=True, exist_ok=True)
    from app.config import normalize_database_url

    os.environ["DATABASE_URL"] = normalize_database_url(_database_url())
    os.environ["REDIS_URL"] = _redis_url()
    os.environ.pop("BROKER_URL", None)
    os.environ["MODEL_ID"] = str(ensure_model(TEST_DIR / "models" / "tiny"))
    os.environ["PARLEY_ADMIN_KEY"] = "pk_test_admin_" + secrets.token_urlsafe(16)
    # Short enough for the fault tests; the defaults are for production.
    os.environ.setdefault("RECONCILE_INTERVAL_SECONDS", "2")
    os.environ.setdefault("WORKER_HEARTBEAT_SECONDS", "1")
    os.environ.setdefault("TURN_LEASE_SECONDS", "4")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    # Webhook receivers in the tests listen on loopback, which the SSRF guard refuses otherwise.
    os.environ.setdefault("WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    from app.config import get_settings

    get_settings.cache_clear()


def pytest_unconfigure(config: pytest.Config) -> None:
    _stack.close()
