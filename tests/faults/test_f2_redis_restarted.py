"""F2: Redis restarts with no persistence while 200 jobs are queued: the broker's messages and
the context cache are gone; the reconciler sends the jobs again and the context is rebuilt from
PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.harness import FaultWorld, report

CONVERSATIONS = 50
TURNS = 4  # queued turns per conversation: 200 jobs
NEW_TOKENS = 8


@pytest.mark.faults
def test_f2_redis_restarted_empty_with_jobs_queued(
    make_world: Callable[..., FaultWorld],
) -> None:
    # Every conversation's next turn in the broker when it restarts: the tenant's share is
    # all of them (with the default share most would be held in PostgreSQL, out of harm).
    world = make_world(FAIR_SHARE_DEFAULT=str(CONVERSATIONS))
    world.api()
    key = world.create_key("f2")
    # First turns run and end, so that each conversation has a cached context in Redis.
    firsts, conversations = world.new_conversations(key, CONVERSATIONS, max_new_tokens=NEW_TOKENS)
    warm = world.worker("f2-warm")
    outcome, _ = world.wait_terminal(firsts, timeout=60)
    world.require(outcome.succeeded == len(firsts), f"the first turns: {outcome}")
    assert world.stack is not None
    world.stack.stop([warm])
    cache = world.redis_client(0)
    cached = sum(1 for k in cache.scan_iter("parley:context:*") if not k.endswith(":upto"))

    # 200 turns queued with no worker: each conversation's next one is in the broker.
    ids = world.more_turns(key, conversations, TURNS, max_new_tokens=NEW_TOKENS)
    broker = world.redis_client(1)
    in_broker = broker.llen("parley.turns")
    world.restart_redis_empty()
    back = time.monotonic()
    assert broker.llen("parley.turns") == 0, "Redis kept its messages"
    assert not list(cache.scan_iter("parley:context:*")), "Redis kept the context cache"

    world.worker("f2-after")
    outcome, _ = world.wait_terminal(ids, timeout=60 - (time.monotonic() - back))
    recovery_s = time.monotonic() - back
    with world.db() as conn:
        wrong_context = conn.execute(
            "SELECT count(*) FROM jobs WHERE id = ANY(%s)"
            " AND context_messages IS DISTINCT FROM 2 * (turn - 1)",
            [ids],
        ).fetchone()
    report(
        "F2",
        len(ids),
        outcome,
        recovery_s,
        in_broker_before=in_broker,
        contexts_cached_before=cached,
        wrong_context=wrong_context[0] if wrong_context else None,
    )
    assert cached == CONVERSATIONS
    assert in_broker == CONVERSATIONS
    world.require(outcome.terminal == len(ids), f"all terminal within 60 s: {outcome}")
    world.require(outcome.succeeded == len(ids), f"all succeeded: {outcome}")
    assert outcome.duplicate_replies == 0
    # Every turn's prompt held the whole conversation so far, read from PostgreSQL.
    assert wrong_context == (0,)
