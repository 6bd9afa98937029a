"""Delivery code against the real database, run in this process: whatever fails inside an
attempt is recorded as that attempt and the schedule moves on; the sweep is fair between
tenants."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update

from app.config import get_settings
from app.db import session_scope
from app.models import WebhookAttempt, WebhookEvent
from app.models.base import utcnow
from app.webhooks import signing, ssrf
from tests.integration.helpers import Api
from tests.integration.test_webhooks import attempts, event_id_of
from worker.io_worker import delivery, sender

pytestmark = pytest.mark.integration

# Nothing listens there; these tests never let a connection be made anyway.
URL = "http://127.0.0.1:9/hook"


def ended_job(api: Api, key: str, url: str = URL) -> str:
    """A job with a webhook, ended (cancelled: no worker needed; should the session's turn
    workers have taken it, it ends when they stop it or finish); its id."""
    job = api.submit(key, message="x", webhook_url=url)
    answer = api.request("POST", f"/v1/jobs/{job['id']}/cancel", key)
    assert answer.status_code in (200, 409), answer.text
    api.wait(key, job["id"])
    return str(job["id"])


def event_of(job_id: str) -> WebhookEvent:
    with session_scope() as session:
        event = session.execute(
            select(WebhookEvent).where(WebhookEvent.job_id == job_id)
        ).scalar_one()
        session.expunge(event)
        return event


def raising(exc: BaseException) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


FAILURES = [
    pytest.param(
        "exchange",
        ExceptionGroup("unhandled errors in a TaskGroup", [OverflowError("port must be 0-65535.")]),
        "OverflowError: port must be 0-65535.",
        id="exception-group-from-the-network",
    ),
    pytest.param("exchange", ZeroDivisionError("boom"), "ZeroDivisionError: boom", id="anything"),
    pytest.param(
        "check_url",
        OverflowError("getsockaddrarg"),
        "the URL could not be checked, no connection made: OverflowError: getsockaddrarg",
        id="guard",
    ),
    pytest.param(
        "resolve_host",
        ssrf.UnsafeWebhookUrl("x" * 3000),
        "refused, no connection made: xxx",
        id="a-reason-longer-than-its-column",
    ),
    pytest.param(
        "signing", RuntimeError("no secret"), "internal error, attempt abandoned", id="signing"
    ),
]


@pytest.mark.parametrize(("where", "exc", "error"), FAILURES)
def test_any_failure_of_an_attempt_is_recorded_and_the_schedule_moves_on(
    api_no_workers: Api,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    exc: BaseException,
    error: str,
) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    # A name for the resolver's case: a literal is not looked up.
    job_id = ended_job(api, key, "http://localhost:9/hook" if where == "resolve_host" else URL)
    fail = raising(exc)
    if where == "exchange":

        async def exchange(*args: Any) -> tuple[int, int]:
            return fail()  # type: ignore[no-any-return]

        monkeypatch.setattr(sender, "_exchange", exchange)
    elif where == "check_url":
        monkeypatch.setattr(ssrf, "check_url", fail)
    elif where == "resolve_host":
        monkeypatch.setattr(ssrf, "resolve_host", fail)
    else:
        monkeypatch.setattr(signing, "sign_headers", fail)
    settings = get_settings()
    before = utcnow()

    assert delivery.deliver(event_id_of(job_id), settings) == "pending"
    [attempt] = attempts(api, key, job_id)
    assert attempt["attempt"] == 1 and attempt["status_code"] is None
    assert error in attempt["error"] and len(attempt["error"]) <= delivery.MAX_ERROR_CHARS
    event = event_of(job_id)
    assert (event.status, event.attempts, event.lease_expires_at) == ("pending", 1, None)
    # The next attempt is the schedule's first retry, not the lease's end.
    assert event.next_attempt_at is not None
    first_retry = timedelta(seconds=settings.webhook_retry_schedule[0])
    assert before + first_retry <= event.next_attempt_at

    # Due again, it fails again, recorded again, the count and the records in step.
    with session_scope() as session:
        session.execute(
            text("UPDATE webhook_events SET next_attempt_at = now() WHERE job_id = :j"),
            {"j": job_id},
        )
    assert delivery.deliver(event_id_of(job_id), settings) == "pending"
    assert [a["attempt"] for a in attempts(api, key, job_id)] == [1, 2]
    assert event_of(job_id).attempts == 2


def test_the_sweep_sends_every_tenants_earliest_attempt_first(api_no_workers: Api) -> None:
    """Tenant A has a backlog of due attempts, all due before tenant B's one: B's is sent in
    the first sweep, and the sweeps that follow take both tenants in turn."""
    api = api_no_workers
    busy, quiet = api.create_key("busy"), api.create_key("quiet")
    backlog = [ended_job(api, busy) for _ in range(8)]
    lone = ended_job(api, quiet)
    now = utcnow()
    with session_scope() as session:
        # The backlog is due earliest, a second apart from an hour ago; the lone event ten
        # minutes ago. None is in the broker.
        due_at = {job: now - timedelta(hours=1, seconds=-i) for i, job in enumerate(backlog)}
        due_at[lone] = now - timedelta(minutes=10)
        for job_id, at in due_at.items():
            session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.job_id == job_id)
                .values(next_attempt_at=at, enqueued_at=None)
            )
    settings = get_settings()

    def sent() -> set[str]:
        with session_scope() as session:
            return set(
                session.execute(
                    select(WebhookEvent.job_id).where(WebhookEvent.enqueued_at.is_not(None))
                ).scalars()
            )

    assert delivery.sweep_due(settings, batch=3) == 3
    assert sent() == {lone, backlog[0], backlog[1]}
    assert delivery.sweep_due(settings, batch=3) == 3
    assert sent() == {lone, *backlog[:5]}
    # What is sent is not sent again before WEBHOOK_REDISPATCH_SECONDS.
    assert delivery.sweep_due(settings, batch=100) == 3
    assert sent() == {lone, *backlog}
    assert delivery.sweep_due(settings, batch=100) == 0
    with session_scope() as session:
        assert session.execute(select(WebhookAttempt)).first() is None


def test_the_sweep_skips_attempts_in_flight_and_not_due(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    in_flight, later, due = (ended_job(api, key) for _ in range(3))
    with session_scope() as session:
        session.execute(text("UPDATE webhook_events SET enqueued_at = NULL"))
        session.execute(
            text(
                "UPDATE webhook_events SET lease_expires_at = now() + interval '1 minute' "
                "WHERE job_id = :j"
            ),
            {"j": in_flight},
        )
        session.execute(
            text(
                "UPDATE webhook_events SET next_attempt_at = now() + interval '1 minute' "
                "WHERE job_id = :j"
            ),
            {"j": later},
        )
    assert delivery.sweep_due(get_settings()) == 1
    assert event_of(due).enqueued_at is not None
    assert event_of(in_flight).enqueued_at is None and event_of(later).enqueued_at is None
