"""Bounded statements: the API's stop after API_STATEMENT_TIMEOUT_SECONDS and answer `503`;
the workers' and the command line's run as long as they need."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.db import get_engine, make_engine
from app.dev.stack import Stack
from tests.integration.helpers import Api
from tests.integration.test_admin_search import seed_conversation

pytestmark = pytest.mark.integration

SHOW_TIMEOUT = "SHOW statement_timeout"


def test_a_search_past_the_statement_timeout_is_a_503(
    api_no_workers: Api, database_url: str, tmp_path: Path
) -> None:
    """`parley api` with a 0.3 s timeout, and an admin search whose statement waits on a lock
    another session holds on `messages` (as it would behind a long migration, or run slowly
    over a huge table): PostgreSQL cancels it at 0.3 s, the API answers a 503 problem with
    Retry-After and logs the statement without its values; the next search is served."""
    seed_conversation("acme", [("zebras are striped", None, "failed")])
    log = tmp_path / "api.log"
    headers = api_no_workers.auth(api_no_workers.admin_key)
    blocker = create_engine(database_url)
    with Stack({"API_STATEMENT_TIMEOUT_SECONDS": "0.3", "LOG_LEVEL": "INFO"}) as stack:
        stack.api(log=log)
        assert stack.base_url is not None and stack.wait_ready("/livez", timeout=60)
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as client:
            path = "/v1/admin/conversations"
            assert len(client.get(path, params={"q": "zebra"}).json()["data"]) == 1
            with blocker.connect() as connection:
                connection.execute(text("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE"))
                started = time.monotonic()
                answer = client.get(path, params={"q": "zebrasecret"})
                waited = time.monotonic() - started
                export = client.get("/v1/admin/export", params={"q": "zebrasecret"})
                connection.rollback()
            assert answer.status_code == 503, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.headers["retry-after"] == "5"
            assert "time limit" in answer.json()["detail"]
            assert 0.3 <= waited < 5, waited
            # The export's first page is read before the answer starts: a problem too.
            assert export.status_code == 503, export.text
            assert len(client.get(path, params={"q": "zebra"}).json()["data"]) == 1
    blocker.dispose()
    logged = log.read_text()
    assert "ran past the statement timeout on GET /v1/admin/conversations" in logged
    assert "zebrasecret" not in logged


def test_only_the_api_bounds_its_statements(api_no_workers: Api, database_url: str) -> None:
    """The in-process API (the tests' app) gave this process's engine the setting's timeout
    (10 s by default); a process that never starts the API, as a worker, gets none whatever
    the setting; make_engine keeps the URL's own options."""
    with get_engine().connect() as connection:
        assert connection.execute(text(SHOW_TIMEOUT)).scalar_one() == "10s"
    worker_like = (
        "from sqlalchemy import text\n"
        "from app.db import session_scope\n"
        "with session_scope() as session:\n"
        f"    print(session.execute(text({SHOW_TIMEOUT!r})).scalar_one())\n"
    )
    env = {**os.environ, "API_STATEMENT_TIMEOUT_SECONDS": "0.3"}
    done = subprocess.run(
        [sys.executable, "-c", worker_like], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
    separator = "&" if "?" in database_url else "?"
    engine = make_engine(
        f"{database_url}{separator}options=-csearch_path%3Dpg_catalog", statement_timeout_s=0.25
    )
    with engine.connect() as connection:
        assert connection.execute(text(SHOW_TIMEOUT)).scalar_one() == "250ms"
        assert connection.execute(text("SHOW search_path")).scalar_one() == "pg_catalog"
    engine.dispose()
