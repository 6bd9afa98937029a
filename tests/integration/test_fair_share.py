"""Fair share between tenants (api.md): a tenant has at most its share of jobs waiting in the
broker; its other ready jobs are held in PostgreSQL and sent as earlier ones start or end.

No worker takes these jobs (the `shares` fixture), and starts are made by calling the claim
a worker makes, on the real database, so that the held jobs can be read at each step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.jobs import lifecycle
from app.models import Job, JobStatus
from tests.integration.helpers import Api
from worker.turn_worker.reconciler import reconcile

pytestmark = pytest.mark.integration


def _sent(job_id: str) -> bool:
    with session_scope() as session:
        return session.get_one(Job, job_id).enqueued_at is not None


def _counts(tenant: str) -> tuple[int, int]:
    """(sent and waiting, held) for the tenant."""
    with session_scope() as session:
        queued = select(Job).where(Job.status == JobStatus.queued, Job.tenant_id == tenant)
        rows = list(session.execute(queued).scalars())
    return sum(j.enqueued_at is not None for j in rows), sum(
        j.enqueued_at is None and j.ready_at is not None for j in rows
    )


def _start(job_id: str) -> None:
    with session_scope() as session:
        assert lifecycle.claim(session, job_id=job_id, lease_seconds=60) is not None


def _position(api: Api, key: str, job_id: str) -> int:
    return int(api.request("GET", f"/v1/jobs/{job_id}", key).json()["queue_position"])


def _tenant(job_id: str) -> str:
    with session_scope() as session:
        return session.get_one(Job, job_id).tenant_id


def test_a_tenant_past_its_share_is_held_and_others_go_ahead(
    api_no_workers: Api, shares: Any
) -> None:
    api = api_no_workers
    a, b = api.create_key("acme"), api.create_key("globex")
    flood = [api.submit(a, message=f"a{n}")["id"] for n in range(6)]
    tenant_a = _tenant(flood[0])
    assert [_sent(j) for j in flood] == [True, True, False, False, False, False]
    assert [api.submit(a, message="x")["queue_position"]] == [6]  # its own five, then this
    other = api.submit(b, message="b0")
    # The other tenant is sent at once, behind only what the broker already holds.
    assert _sent(other["id"]) and other["queue_position"] == 2
    assert [_position(api, a, j) for j in flood] == [0, 1, 3, 4, 5, 6]

    _start(flood[0])  # a worker takes acme's first: its oldest held job takes the place
    assert _sent(flood[2]) and not _sent(flood[3])
    assert _counts(tenant_a) == (2, 4)

    cancelled = api.request("POST", f"/v1/jobs/{flood[1]}/cancel", a)
    assert cancelled.json()["status"] == "cancelled"  # left the broker unstarted: room again
    assert _sent(flood[3]) and _counts(tenant_a) == (2, 3)

    conversation = api.request("GET", f"/v1/jobs/{flood[2]}", a).json()["conversation_id"]
    assert api.request("DELETE", f"/v1/conversations/{conversation}", a).status_code == 204
    assert _sent(flood[4]) and _counts(tenant_a) == (2, 2)


def test_a_held_submit_is_told_its_place_behind_other_tenants(
    api_no_workers: Api, shares: Any
) -> None:
    """The 202 of a held job counts the other tenants' backlogs as the broker interleaves
    them, as GET counts them."""
    api = api_no_workers
    a, b = api.create_key("acme"), api.create_key("globex")
    for n in range(6):
        api.submit(a, message=f"a{n}")  # 2 sent, 4 held
    held = [api.submit(b, message=f"b{n}") for n in range(3)][-1]
    assert not _sent(held["id"])
    # Every sent job (2 + 2), none of its own ahead, then one of acme's held for its first
    # (equal shares): the 5th to run.
    assert held["queue_position"] == _position(api, b, held["id"]) == 5


def test_a_later_turn_is_held_when_it_becomes_ready_past_the_share(
    api_no_workers: Api, shares: Any
) -> None:
    api = api_no_workers
    a = api.create_key("acme")
    first = api.submit(a, message="one")
    second = api.submit(a, message="two", conversation_id=first["conversation_id"])
    others = [api.submit(a, message=f"o{n}")["id"] for n in range(2)]
    assert not _sent(second["id"])  # not ready: its conversation's first is unfinished
    tenant = _tenant(first["id"])
    assert _counts(tenant) == (2, 1)  # first and o0 sent; o1 held
    with session_scope() as session:
        claim = lifecycle.claim(session, job_id=first["id"], lease_seconds=60)
    assert claim is not None and _sent(others[1])
    with session_scope() as session:
        job = lifecycle.owned_job(session, claim)
        assert job is not None
        lifecycle.end_job(session, job, JobStatus.failed, error_code="x", error_message="x")
    # Ready now, but acme has o0 and o1 waiting in the broker: held, after them.
    assert not _sent(second["id"]) and _counts(tenant) == (2, 1)
    _start(others[0])
    assert _sent(second["id"])


def test_shares_are_weights_per_tenant(api_no_workers: Api, shares: Any) -> None:
    api = api_no_workers
    a, b = api.create_key("acme"), api.create_key("globex")
    first_a = api.submit(a, message="a")["id"]
    first_b = api.submit(b, message="b")["id"]
    shares.fair_share_tenants = {_tenant(first_a): 5, _tenant(first_b): 1}
    for n in range(9):
        api.submit(a, message=f"a{n}")
        api.submit(b, message=f"b{n}")
    assert _counts(_tenant(first_a)) == (5, 5)
    assert _counts(_tenant(first_b)) == (1, 9)


def test_the_reconciler_sends_held_jobs_when_room_was_made_otherwise(
    api_no_workers: Api, shares: Any, no_other_reconciler: Callable[[], None]
) -> None:
    api = api_no_workers
    a = api.create_key("acme")
    jobs = [api.submit(a, message=f"a{n}")["id"] for n in range(5)]
    tenant = _tenant(jobs[0])
    assert _counts(tenant) == (2, 3)
    shares.fair_share_default = 4  # room made without a start (an operator raised the share)
    no_other_reconciler()
    # A session worker's round may hold the lock at this moment (then this one is skipped);
    # theirs, at the default share of 2, sends none of these.
    deadline = time.monotonic() + 15
    reconcile(shares)
    while _counts(tenant) != (4, 1):
        assert time.monotonic() < deadline, f"not reconciled: {_counts(tenant)}"
        time.sleep(0.2)
        reconcile(shares)


def test_racing_submits_and_starts_never_leave_a_job_held_with_room(
    api_no_workers: Api, shares: Any
) -> None:
    """The lock's promise: whatever interleaving of holds and releases, when the dust settles
    either nothing is held or the tenant's share of the broker is full."""
    api = api_no_workers
    a = api.create_key("acme")
    tenant = _tenant(api.submit(a, message="seed")["id"])
    errors: list[BaseException] = []

    def submit_many() -> None:
        try:
            for n in range(15):
                api.submit(a, message=f"m{n}")
        except BaseException as exc:
            errors.append(exc)

    def start_many() -> None:
        try:
            for _ in range(40):
                with session_scope() as session:
                    waiting = session.execute(
                        select(Job.id)
                        .where(Job.status == JobStatus.queued, Job.enqueued_at.is_not(None))
                        .order_by(Job.enqueued_at)
                        .limit(1)
                    ).scalar_one_or_none()
                if waiting is not None:
                    with session_scope() as session:
                        lifecycle.claim(session, job_id=waiting, lease_seconds=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (submit_many, submit_many, start_many)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    sent, held = _counts(tenant)
    assert held == 0 or sent >= 2, (sent, held)
    with session_scope() as session:
        total = session.execute(
            select(func.count()).select_from(Job).where(Job.tenant_id == tenant)
        ).scalar_one()
    assert total == 31
