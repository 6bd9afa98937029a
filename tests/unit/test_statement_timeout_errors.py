"""A statement the statement timeout cancelled is a 503 problem with Retry-After, logged
without its bound values; other database errors keep their own answer."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi import FastAPI
from psycopg import errors as pg_errors
from sqlalchemy.exc import OperationalError
from starlette.requests import Request
from starlette.responses import Response

from app.errors import install_error_handlers, statement_timed_out

STATEMENT = "SELECT messages.id FROM messages WHERE messages.content ILIKE %(content_1)s"


def _answer(exc: Exception) -> tuple[int, dict[str, str], dict[str, object]]:
    app = FastAPI()
    install_error_handlers(app)
    handler = app.exception_handlers[OperationalError]
    request = Request({"type": "http", "method": "GET", "path": "/v1/admin/conversations",
                       "query_string": b"", "headers": []})  # fmt: skip
    response: Response = asyncio.run(handler(request, exc))  # type: ignore[arg-type]
    return response.status_code, dict(response.headers), json.loads(bytes(response.body))


def _error(orig: Exception) -> OperationalError:
    # hide_parameters off: the log line must not depend on the engine's flag.
    return OperationalError(STATEMENT, {"content_1": "%secret words%"}, orig)


def test_a_cancelled_statement_is_a_503_logged_without_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = _error(pg_errors.QueryCanceled("canceling statement due to statement timeout"))
    assert statement_timed_out(exc)
    with caplog.at_level(logging.ERROR, logger="parley.errors"):
        status, headers, body = _answer(exc)
    assert status == 503
    assert headers["content-type"] == "application/problem+json"
    assert headers["retry-after"] == "5"
    assert body["status"] == 503 and "time limit" in str(body["detail"])
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "statement timeout on GET /v1/admin/conversations" in logged
    assert "ILIKE %(content_1)s" in logged
    assert "secret" not in logged


def test_other_database_errors_stay_an_outage() -> None:
    exc = _error(pg_errors.AdminShutdown("terminating connection due to administrator command"))
    assert not statement_timed_out(exc)
    status, headers, body = _answer(exc)
    assert status == 503 and headers["retry-after"] == "5"
    assert "backing service" in str(body["detail"])
