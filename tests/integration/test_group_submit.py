"""Submits stored as a group (app.jobs.intake, app.jobs.submission): turns that arrive
together share one transaction, and each still gets the answer it would get alone.

Each test queues its turns on a real Intake before its runners start, so that the first
runner takes them all as one group (the tests check they were: one transaction, one moment),
on the real database; their sends go to a broker no worker listens to (`shares`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from app.config import get_settings
from app.db import make_async_pool, session_scope
from app.errors import ProblemError
from app.jobs.intake import Intake
from app.jobs.schemas import JobCreate
from app.jobs.submission import NewTurn, Submitted, UnsentCounts
from app.models import Conversation, Job, Message
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration


def _turn(tenant: str, message: str, **options: Any) -> NewTurn:
    conversation_id = options.pop("conversation_id", None)
    body = JobCreate(message=message, conversation_id=conversation_id)
    return NewTurn.of(tenant_id=tenant, request=body, settings=get_settings(), **options)


def _store_as_one_group(
    database_url: str, turns: Sequence[NewTurn]
) -> list[Submitted | BaseException]:
    async def run() -> list[Submitted | BaseException]:
        pool = make_async_pool(database_url, size=2)
        await pool.open(wait=True)
        intake = Intake(pool, asyncio.Semaphore(2), UnsentCounts())
        try:
            answers = [asyncio.ensure_future(intake.submit(turn)) for turn in turns]
            await asyncio.sleep(0)  # every turn queued before a runner takes any
            intake.start()
            return await asyncio.gather(*answers, return_exceptions=True)
        finally:
            await intake.stop()
            await pool.close()

    return asyncio.run(run())


def _status(outcome: Submitted | BaseException) -> int:
    if isinstance(outcome, Submitted):
        return 202
    assert isinstance(outcome, ProblemError), repr(outcome)
    return outcome.status


def _stored(*job_ids: str) -> list[Job]:
    with session_scope() as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids))).all()
        return sorted(jobs, key=lambda job: job_ids.index(job.id))


def _one_moment(jobs: Sequence[Job]) -> None:
    """The jobs were stored in one transaction (their moment is the group's)."""
    assert len({job.created_at for job in jobs}) == 1


def test_turns_of_one_conversation_in_one_group_are_numbered_in_order(
    api_no_workers: Api, database_url: str, shares: Any
) -> None:
    api = api_no_workers
    acme = api.create_key("acme")
    api.create_key("globex")
    first = api.submit(acme, message="turn 1")
    conversation = first["conversation_id"]
    outcomes = _store_as_one_group(
        database_url,
        [
            _turn("acme", "turn 2", conversation_id=conversation),
            _turn("globex", "a conversation of its own"),
            _turn("acme", "turn 3", conversation_id=conversation),
        ],
    )
    assert [_status(outcome) for outcome in outcomes] == [202, 202, 202]
    second, other, third = (o for o in outcomes if isinstance(o, Submitted))
    assert (second.turn, third.turn, other.turn) == (2, 3, 1)
    # Turn 1 is unfinished: 2 waits for it and 3 for 2 (neither sent); the other tenant's new
    # conversation is ready and within its share.
    assert (second.send, third.send, other.send) == (False, False, True)
    jobs = _stored(second.job.id, third.job.id, other.job.id)
    _one_moment(jobs)
    assert [job.ready_at is not None for job in jobs] == [False, False, True]
    with session_scope() as session:
        row = session.get_one(Conversation, conversation)
        assert (row.turn_count, row.message_count) == (3, 3)
        messages = session.scalars(
            select(Message).where(Message.conversation_id == conversation).order_by(Message.seq)
        ).all()
        assert [(m.seq, m.content) for m in messages] == [
            (1, "turn 1"),
            (3, "turn 2"),
            (5, "turn 3"),
        ]


def test_a_refused_turn_writes_nothing_and_counts_for_nothing(
    api_no_workers: Api, database_url: str, shares: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = api_no_workers
    acme, globex = api.create_key("acme"), api.create_key("globex")
    acmes = api.submit(acme, message="acme's conversation")["conversation_id"]
    globexs = api.submit(globex, message="globex's conversation")["conversation_id"]
    monkeypatch.setattr(get_settings(), "max_unfinished_jobs_per_tenant", 3)
    outcomes = _store_as_one_group(
        database_url,
        [
            _turn("acme", "not acme's", conversation_id=globexs),  # 404
            _turn("acme", "new 1"),  # acme's 2nd unfinished job
            _turn("acme", "again", conversation_id=acmes, follows_turn=1),  # its 3rd
            _turn("acme", "new 2"),  # a 4th: over the limit
            _turn("globex", "again", conversation_id=globexs, follows_turn=1),
            _turn("globex", "also after turn 1", conversation_id=globexs, follows_turn=1),
        ],
    )
    assert [_status(outcome) for outcome in outcomes] == [404, 202, 202, 429, 202, 409]
    stored = [o for o in outcomes if isinstance(o, Submitted)]
    assert [o.turn for o in stored] == [1, 2, 2]
    _one_moment(_stored(*(o.job.id for o in stored)))
    with session_scope() as session:
        counts = {
            row.id: (row.turn_count, row.message_count)
            for row in session.scalars(select(Conversation))
        }
        assert counts[acmes] == (2, 2) and counts[globexs] == (2, 2)
        assert session.query(Job).count() == 2 + 3
        refused = ("not acme's", "new 2", "also after turn 1")
        assert not session.scalars(select(Message).where(Message.content.in_(refused))).all()


def test_a_group_sends_each_tenant_its_share_and_holds_the_rest(
    api_no_workers: Api, database_url: str, shares: Any
) -> None:
    api = api_no_workers
    api.create_key("acme")
    api.create_key("globex")
    turns = [_turn("acme", f"a{n}") for n in range(5)] + [_turn("globex", "g0")]
    outcomes = _store_as_one_group(database_url, turns)
    submitted = [o for o in outcomes if isinstance(o, Submitted)]
    assert len(submitted) == 6
    assert [o.send for o in submitted] == [True, True, False, False, False, True]
    _one_moment(_stored(*(o.job.id for o in submitted)))
    # The held ones wait behind every sent job (3) and their own tenant's held before them.
    assert [o.job.queue_position for o in submitted[2:5]] == [3, 4, 5]
    assert sorted(o.job.queue_position for o in (submitted[0], submitted[1], submitted[5])) == [
        0,
        1,
        2,
    ]


def test_a_turn_the_database_refuses_fails_alone(
    api_no_workers: Api, database_url: str, shares: Any
) -> None:
    """A value PostgreSQL refuses fails the group's transaction; its turns are then stored
    one by one, and only that turn fails. (The API refuses a NUL in a message before it gets
    here; the turn is built past that check to stand for any value the database refuses.)"""
    api_no_workers.create_key("acme")
    refused = JobCreate.model_construct(
        message="a NUL \x00 in text", conversation_id=None, system_prompt=None, metadata={}
    )
    bad = NewTurn.of(tenant_id="acme", request=refused, settings=get_settings())
    outcomes = _store_as_one_group(
        database_url, [_turn("acme", "before"), bad, _turn("acme", "after")]
    )
    assert isinstance(outcomes[1], psycopg.DataError)
    assert isinstance(outcomes[0], Submitted) and isinstance(outcomes[2], Submitted)
    assert len(_stored(outcomes[0].job.id, outcomes[2].job.id)) == 2


def test_a_request_cancelled_meanwhile_ends_once_its_turn_is_stored(
    api_no_workers: Api, database_url: str, shares: Any
) -> None:
    """Its group goes on; the request's way out (an Idempotency-Key freed unless a job holds
    it) then sees the stored job."""
    api_no_workers.create_key("acme")

    async def run() -> int:
        pool = make_async_pool(database_url, size=2)
        await pool.open(wait=True)
        intake = Intake(pool, asyncio.Semaphore(2), UnsentCounts())
        intake.start()
        try:
            request = asyncio.ensure_future(intake.submit(_turn("acme", "going, gone")))
            await asyncio.sleep(0.001)  # queued, and taken by a runner
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            with session_scope() as session:
                return session.query(Job).count()
        finally:
            await intake.stop()
            await pool.close()

    assert asyncio.run(run()) == 1
