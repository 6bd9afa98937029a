"""F15: short outages of Redis and of PostgreSQL cost no turn and no attempt."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.faults.harness import FaultWorld, report

TURNS = 32
# Seconds of generation for 32 turns in one batch with the tiny model (2.5 s at 500 on a fast
# day): the outage falls in the middle of it. A few turns stop early at their end-of-text
# token whatever the limit.
LONG_TOKENS = 900


@pytest.mark.faults
def test_f15a_redis_outage_while_turns_generate(make_world: Callable[..., FaultWorld]) -> None:
    # All 32 in one batch: the tenant's share lets them into the broker at once.
    world = make_world(WORKER_MAX_BATCH=str(TURNS), FAIR_SHARE_DEFAULT=str(TURNS))
    world.api()
    key = world.create_key("f15a")
    # As in production, under the supervisor: Celery 5.7's worker exits once its broker
    # connection comes back (kombu fails restoring its unacknowledged messages, an upstream
    # bug), and the supervisor starts it again; no turn may fail or lose an attempt for it.
    worker = world.worker("f15a", supervised=True)
    world.wait_worker("f15a", worker)
    world.wait_broker_marker()
    ids, _ = world.new_conversations(key, TURNS, max_new_tokens=LONG_TOKENS)

    world.wait_running(TURNS, timeout=30)
    time.sleep(0.2)  # generating
    world.redis.stop()
    running_at_outage = world.status_counts().get("running", 0)
    time.sleep(2)
    # Some end meanwhile (their ends are stored in PostgreSQL; only the notices need Redis).
    running_after_outage = world.status_counts().get("running", 0)
    world.redis.start()
    back = time.monotonic()

    outcome, _ = world.wait_terminal(ids, timeout=60)
    recovery_s = time.monotonic() - back
    # The worker goes on serving: a turn submitted after the outage is run by it.
    after = world.submit(key, "After the outage.", generation={"max_new_tokens": 8})["id"]
    after_outcome, _ = world.wait_terminal([after], timeout=20)
    report(
        "F15a",
        len(ids),
        outcome,
        recovery_s,
        running_at_outage=running_at_outage,
        running_after_outage=running_after_outage,
        max_attempts=outcome.max_attempts,
        errors=outcome.errors or None,
        supervisor_alive_after=worker.poll() is None,
        worker_restarts=world.log.read_text().count("exited; restarting it"),
        turn_after_outage=after_outcome.statuses,
    )
    # Most of them: the few that met their end-of-text token first may have ended.
    assert running_at_outage >= TURNS * 3 // 4, "the outage did not fall while turns generated"
    world.require(outcome.succeeded == len(ids), f"all succeeded: {outcome}")
    world.require(outcome.max_attempts == 1, f"no attempt lost: {outcome}")
    assert outcome.duplicate_replies == 0
    world.require(worker.poll() is None, "the supervised worker outlived the Redis outage")
    world.require(after_outcome.succeeded == 1, "a turn submitted after the outage succeeded")


POSTGRES_OUTAGE_S = 10.0
CLAIMS = 20


@pytest.mark.faults
def test_f15b_postgres_outage_while_a_worker_claims(
    make_world: Callable[..., FaultWorld],
) -> None:
    world = make_world()
    world.api()
    key = world.create_key("f15b")
    worker = world.worker("f15b")
    world.wait_worker("f15b", worker)
    world.wait_broker_marker()
    # The worker (its connection pool warm) is paused while the turns are queued, so that it
    # takes their messages, and claims them, while PostgreSQL is down.
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        ids, _ = world.new_conversations(key, CLAIMS, max_new_tokens=8)
        world.pg.stop()
        down = time.monotonic()
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    time.sleep(max(0.0, POSTGRES_OUTAGE_S - (time.monotonic() - down)))
    world.pg.start()
    back = time.monotonic()
    claims_retried = sum(
        1
        for line in world.log.read_text(errors="replace").splitlines()
        if "parley.db_retry" in line and "database unavailable" in line
    )

    outcome, _ = world.wait_terminal(ids, timeout=60)
    recovery_s = time.monotonic() - back
    report(
        "F15b",
        len(ids),
        outcome,
        recovery_s,
        max_attempts=outcome.max_attempts,
        db_retries_logged=claims_retried,
        errors=outcome.errors or None,
    )
    assert claims_retried > 0, "no claim met the outage"
    world.require(outcome.succeeded == len(ids), f"all succeeded: {outcome}")
    world.require(outcome.max_attempts == 1, f"no attempt lost: {outcome}")
    assert outcome.duplicate_replies == 0
    world.require(worker.poll() is None, "the worker outlived the PostgreSQL outage")
