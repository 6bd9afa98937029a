"""F1: `kill -9` the worker in the middle of generating, 200 jobs in flight; start a new one."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.harness import TERMINAL, FaultWorld, report

CONVERSATIONS = 50
TURNS = 4  # 200 jobs
NEW_TOKENS = 48  # long enough that turns are still generating when the worker dies
# Any loopback URL: no I/O worker runs, so the events are only stored (one per job at most).
WEBHOOK = "http://127.0.0.1:9/hook"


@pytest.mark.faults
def test_f1_worker_killed_mid_generation(make_world: Callable[..., FaultWorld]) -> None:
    world = make_world()
    world.api()
    key = world.create_key("f1")
    # A broker that a reconciler has seen before (its marker set), as in a running service:
    # a new one would have every queued job sent twice by the first worker's reconciler.
    warm = world.worker("f1-warm")
    world.wait_worker("f1-warm", warm)
    world.wait_broker_marker()
    assert world.stack is not None
    world.stack.stop([warm])
    ids, conversations = world.new_conversations(
        key, CONVERSATIONS, max_new_tokens=NEW_TOKENS, webhook_url=WEBHOOK
    )
    ids += world.more_turns(
        key, conversations, TURNS - 1, max_new_tokens=NEW_TOKENS, webhook_url=WEBHOOK
    )
    assert len(ids) == CONVERSATIONS * TURNS

    # All 200 are accepted and in flight; the first worker takes them and is killed once some
    # have ended while others are claimed and generating, at a moment when it also holds
    # messages it has not claimed yet (as a worker with a prefetch buffer does), or, should
    # it never hold any, once 100 have ended.
    first = world.worker("f1-first")
    deadline = time.monotonic() + 60
    while True:
        counts = world.status_counts()
        ended = sum(counts.get(s, 0) for s in TERMINAL)
        running = counts.get("running", 0)
        holding = len(world.held_messages())
        if ended >= 20 and running >= 8 and (holding > running or ended >= 100):
            break
        assert ended < len(ids), "every turn ended before the kill; nothing was in flight"
        assert first.poll() is None, world.problems()
        assert time.monotonic() < deadline, f"never 8 turns running at once: {counts}"
        time.sleep(0.01)
    engine_gone_s = world.kill(first)
    at_kill = world.status_counts()
    # The jobs whose message died with the worker: the next of their conversation, queued and
    # sent, with no message in the broker's queue. Either the dead worker held it unclaimed
    # (unacknowledged: back only after the broker's visibility timeout), or a job end had
    # committed the dispatch and was killed before it published. The reconciler sends both
    # again once nothing waits in the broker (LOST_AFTER); running jobs come back when their
    # leases expire.
    held = world.held_messages()
    in_queue = world.queued_messages()
    with world.db() as conn:
        next_queued = [
            str(job)
            for (job,) in conn.execute(
                "SELECT j.id FROM jobs j WHERE j.status = 'queued'"
                " AND j.enqueued_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM jobs e"
                " WHERE e.conversation_id = j.conversation_id AND e.turn < j.turn"
                " AND e.status IN ('queued', 'running'))"
            ).fetchall()
        ]
    lost_held = sorted(j for j in next_queued if j not in in_queue and j in held)
    lost_unsent = sorted(j for j in next_queued if j not in in_queue and j not in held)

    second = world.worker("f1-second")
    outcome, recovery_s = world.wait_terminal(ids, timeout=60)
    # Turns run again after the kill streamed anew: their streams still add up to the reply
    # (a greedy turn repeats itself; only what goes beyond the first attempt's is sent).
    with world.db() as conn:
        retried = dict(
            conn.execute(
                "SELECT j.id, m.content FROM jobs j JOIN messages m ON m.job_id = j.id"
                " AND m.role = 'assistant' WHERE j.id = ANY(%s) AND j.attempts > 1",
                [ids],
            ).fetchall()
        )
    broken_streams = [j for j, reply in retried.items() if world.streamed_reply(key, j) != reply]
    report(
        "F1",
        len(ids),
        outcome,
        recovery_s,
        running_at_kill=at_kill.get("running", 0),
        engine_process_gone_s=round(engine_gone_s, 2),
        ended_at_kill=sum(at_kill.get(s, 0) for s in TERMINAL),
        held_unacked=len(held),
        lost_held_unclaimed=len(lost_held),
        lost_unsent=len(lost_unsent),
        max_attempts=outcome.max_attempts,
        duplicate_events=outcome.duplicate_events,
        retried_streams=len(retried),
        broken_streams=len(broken_streams),
    )
    world.require(
        outcome.terminal == len(ids),
        f"all terminal within 60 s: {outcome}; messages lost with the worker: held "
        f"unclaimed {lost_held}, committed and never sent {lost_unsent}",
    )
    world.require(outcome.succeeded == len(ids), f"all succeeded: {outcome}")
    assert outcome.duplicate_replies == 0
    assert outcome.duplicate_events == 0
    assert not broken_streams, broken_streams
    assert second.poll() is None
