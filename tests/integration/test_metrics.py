"""GET /metrics shows the engine at work: the workers' metrics reach the API through Redis.

Workers live for the whole session, so their counters hold earlier tests' turns too: every
assertion is on the change that this test's own turns make."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from app.auth.service import ensure_tenant
from app.db import session_scope
from app.ids import new_id
from app.models import Conversation, Job, JobStatus
from app.schemas import GenerationSettings
from tests.integration.helpers import Api, worker_total

pytestmark = pytest.mark.integration

TURNS = 4

# What this test's turns add, summed over the workers that publish them.
WORKER_COUNTS = (
    'parley_turns_ended_total{status="succeeded"',
    "parley_turn_queue_wait_seconds_count{",
    "parley_turn_run_seconds_count{",
    "parley_worker_time_to_first_token_seconds_count{",
)


def _sample(text: str, line_start: str) -> float | None:
    found = re.search(rf"^{re.escape(line_start)} (\S+)$", text, re.M)
    return None if found is None else float(found.group(1))


def test_metrics_count_this_tests_turns_batches_and_tokens(api: Api) -> None:
    key = api.create_key("acme")
    before = api.settled_metrics(WORKER_COUNTS)
    submitted_before = _sample(before, "parley_jobs_submitted_total") or 0.0
    jobs = [
        api.submit(key, message=f"turn {i}", generation={"max_new_tokens": 8}) for i in range(TURNS)
    ]
    ended = [api.wait(key, job["id"]) for job in jobs]
    assert [job["status"] for job in ended] == ["succeeded"] * TURNS
    per_job = [job["usage"]["completion_tokens"] for job in ended]
    completion_tokens = sum(per_job)

    def grown(text: str) -> dict[str, float]:
        return {
            name: worker_total(text, name) - worker_total(before, name) for name in WORKER_COUNTS
        }

    # Workers publish their metrics with each heartbeat (every second in the tests).
    deadline = time.monotonic() + 15
    after = api.metrics()
    while min(grown(after).values()) < TURNS and time.monotonic() < deadline:
        time.sleep(0.3)
        after = api.metrics()
    assert grown(after) == dict.fromkeys(WORKER_COUNTS, TURNS), grown(after)

    # One token per turn per decoding step: the tokens counted are the tokens the jobs report,
    # and the batch sizes observed add up to them.
    tokens = "parley_worker_generated_tokens_total{"
    assert worker_total(after, tokens) - worker_total(before, tokens) == completion_tokens
    batch_sum = "parley_worker_batch_size_sum{"
    assert worker_total(after, batch_sum) - worker_total(before, batch_sum) == completion_tokens
    steps = "parley_worker_batch_size_count{"
    assert (
        max(per_job)
        <= worker_total(after, steps) - worker_total(before, steps)
        <= completion_tokens
    )

    assert _sample(after, "parley_jobs_submitted_total") == submitted_before + TURNS
    # From the database: nothing of this test is left queued or running.
    assert _sample(after, 'parley_jobs_unfinished{status="queued"}') == 0
    assert _sample(after, 'parley_jobs_unfinished{status="running"}') == 0


def test_unfinished_jobs_are_counted_from_the_database(api: Api) -> None:
    # Rows no worker will take: the queued ones wait behind the running one (whose lease is
    # far off), and they count as sent to the broker just now, so nothing re-sends them.
    now = datetime.now(UTC)
    conversation_id = new_id("conv")
    with session_scope() as session:
        ensure_tenant(session, tenant_id="acme")
        session.add(
            Conversation(
                id=conversation_id, tenant_id="acme", metadata_={}, turn_count=4, message_count=4
            )
        )
        session.flush()
        for turn in range(1, 5):
            session.add(
                Job(
                    id=new_id("job"),
                    tenant_id="acme",
                    conversation_id=conversation_id,
                    turn=turn,
                    status=JobStatus.running if turn == 1 else JobStatus.queued,
                    generation=GenerationSettings(max_new_tokens=8),
                    metadata_={},
                    attempts=1 if turn == 1 else 0,
                    cancel_requested=False,
                    lease_expires_at=now + timedelta(hours=1) if turn == 1 else None,
                    enqueued_at=now,
                )
            )
    text = api.metrics()
    assert _sample(text, 'parley_jobs_unfinished{status="queued"}') == 3
    assert _sample(text, 'parley_jobs_unfinished{status="running"}') == 1


def test_liveness_and_readiness(api: Api) -> None:
    assert api.request("GET", "/livez", None).json() == {"status": "ok"}
    answer = api.request("GET", "/readyz", None)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ready"}
