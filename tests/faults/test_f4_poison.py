"""F4: a job whose generation fails every time (poison), beside ordinary turns."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.faults.harness import FaultWorld, report

POISON = "job_f4poison00000000000000000001"
CONVERSATION = "conv_f4poison0000000000000000001"
# The API refuses it (422); written straight to the database, it reaches the engine, where
# logits / 1e-300 are infinite and their softmax NaN, every time.
POISON_GENERATION = {"max_new_tokens": 8, "temperature": 1e-300, "top_p": 1.0, "seed": None}


@pytest.mark.faults
def test_f4_poison_job_fails_alone(make_world: Callable[..., FaultWorld]) -> None:
    world = make_world()
    world.api()
    poison_key = world.create_key("f4-poison")
    key = world.create_key("f4-ok")
    refused = world.http.post(
        "/v1/jobs",
        headers={"Authorization": f"Bearer {poison_key}"},
        json={"message": "Hello.", "generation": {"temperature": 1e-300}},
    )
    assert refused.status_code == 422, refused.text
    worker = world.worker("f4")
    world.wait_worker("f4", worker)

    # Ready and never sent (its API process died between the commit and the publish, or it
    # is held past its tenant's share): the reconciler sends it within a second.
    with world.db() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO conversations (id, tenant_id, metadata, turn_count, message_count)"
            " VALUES (%s, 'f4-poison', '{}', 1, 1)",
            [CONVERSATION],
        )
        conn.execute(
            "INSERT INTO jobs (id, tenant_id, conversation_id, turn, status, generation,"
            " metadata, attempts, cancel_requested, ready_at)"
            " VALUES (%s, 'f4-poison', %s, 1, 'queued', %s, '{}', 0, false, now())",
            [POISON, CONVERSATION, json.dumps(POISON_GENERATION)],
        )
        conn.execute(
            "INSERT INTO messages (id, conversation_id, job_id, seq, role, content)"
            " VALUES ('msg_f4poison00000000000000000001', %s, %s, 1, 'user', 'Hello.')",
            [CONVERSATION, POISON],
        )
    started = time.monotonic()
    ids, _ = world.new_conversations(key, 10, max_new_tokens=8)

    outcome, _ = world.wait_terminal([POISON, *ids], timeout=60)
    ended_s = time.monotonic() - started

    def poison() -> tuple[str, str | None, int]:
        with world.db() as conn:
            row = conn.execute(
                "SELECT status, error_code, attempts FROM jobs WHERE id = %s", [POISON]
            ).fetchone()
        assert row is not None
        return str(row[0]), row[1], int(row[2])

    first = poison()
    time.sleep(5)  # no message loop: nothing claims it again
    later = poison()
    others = world.outcome(ids)
    queue = world.redis_client(1).llen("parley.turns")
    report(
        "F4",
        1 + len(ids),
        outcome,
        ended_s,
        poison=first,
        poison_5s_later=later,
        others_succeeded=others.succeeded,
        queue_after=queue,
        worker_alive=worker.poll() is None,
    )
    world.require(first[0] == "failed", f"the poison job ended failed: {first}")
    assert first[1] == "numerical_error"
    assert 1 <= first[2] <= 3
    assert later == first
    assert queue == 0
    world.require(others.succeeded == len(ids), f"the other turns succeeded: {others}")
    assert worker.poll() is None, "the worker died"
