"""A turn's claim and end, as a worker makes them (app.jobs.lifecycle), on the real database.

No worker takes these jobs (the `shares` fixture): each test claims and ends them itself, so
that what the claim returns and what the end stores can be read at each step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.jobs import lifecycle
from app.models import Conversation, Job, JobStatus, Message
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration


def _claim(job_id: str) -> lifecycle.Claim:
    with session_scope() as session:
        claim = lifecycle.claim(session, job_id=job_id, lease_seconds=60)
    assert claim is not None
    return claim


def _end(claim: lifecycle.Claim, outcome: lifecycle.Outcome) -> JobStatus | None:
    with session_scope() as session:
        return lifecycle.end_claimed(session, claim, outcome)


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        return job


def _replies(conversation_id: str) -> list[str]:
    with session_scope() as session:
        return list(
            session.execute(
                select(Message.content)
                .where(Message.conversation_id == conversation_id, Message.role == "assistant")
                .order_by(Message.seq)
            ).scalars()
        )


def _message_count(conversation_id: str) -> int:
    with session_scope() as session:
        return session.get_one(Conversation, conversation_id).message_count


def _succeeded(reply: str) -> lifecycle.Outcome:
    return lifecycle.Outcome(
        JobStatus.succeeded,
        reply=reply,
        context_messages=0,
        prompt_tokens=7,
        completion_tokens=3,
        finish_reason="stop",
    )


def test_a_claim_returns_what_its_turn_needs_and_its_end_stores_the_reply(
    api_no_workers: Api, shares: Any
) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    first = api.submit(
        key, message="Hello", system_prompt="Be brief.", generation={"max_new_tokens": 9}
    )
    conversation = first["conversation_id"]
    second = api.submit(key, message="And then?", conversation_id=conversation)

    claim = _claim(first["id"])
    assert (claim.conversation_id, claim.turn, claim.attempts) == (conversation, 1, 1)
    assert (claim.system_prompt, claim.message, claim.context_upto) == ("Be brief.", "Hello", 0)
    assert claim.generation.max_new_tokens == 9 and claim.queued_s >= 0
    # Not its turn while the first runs.
    with session_scope() as session:
        assert lifecycle.claim(session, job_id=second["id"], lease_seconds=60) is None

    assert _end(claim, _succeeded("Hi.")) == JobStatus.succeeded
    job = _job(first["id"])
    assert (job.status, job.prompt_tokens, job.completion_tokens) == ("succeeded", 7, 3)
    assert job.finish_reason == "stop" and job.lease_expires_at is None
    assert job.finished_at is not None
    # Both turns' messages and the first's reply.
    assert _replies(conversation) == ["Hi."] and _message_count(conversation) == 3
    # The next turn is ready and sent, and its claim says which turns its context covers.
    assert _job(second["id"]).enqueued_at is not None
    following = _claim(second["id"])
    assert (following.turn, following.context_upto, following.message) == (2, 1, "And then?")


def test_a_success_asked_to_be_cancelled_meanwhile_ends_cancelled_without_its_reply(
    api_no_workers: Api, shares: Any
) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    job = api.submit(key, message="Hello")
    claim = _claim(job["id"])
    cancel = api.request("POST", f"/v1/jobs/{job['id']}/cancel", key)
    assert cancel.status_code == 200, cancel.text

    assert _end(claim, _succeeded("Too late.")) == JobStatus.cancelled
    assert _job(job["id"]).status == "cancelled"
    assert _replies(job["conversation_id"]) == []
    assert _message_count(job["conversation_id"]) == 1


def test_an_end_by_a_claim_that_lost_its_job_stores_nothing(
    api_no_workers: Api, shares: Any
) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    job = api.submit(key, message="Hello")
    lost = _claim(job["id"])
    # Its lease ran out and another worker took the turn over.
    with session_scope() as session:
        session.get_one(Job, job["id"]).lease_expires_at = datetime.now(UTC) - timedelta(seconds=1)
    owner = _claim(job["id"])
    assert owner.attempts == 2 and owner.token != lost.token

    assert _end(lost, _succeeded("From the lost worker.")) is None
    assert _job(job["id"]).status == "running"
    failed = lifecycle.Outcome(JobStatus.failed, error_code="x", error_message="Broken.")
    assert _end(owner, failed) == JobStatus.failed
    stored = _job(job["id"])
    assert (stored.status, stored.error_code, stored.error_message) == ("failed", "x", "Broken.")
    assert _replies(job["conversation_id"]) == []
