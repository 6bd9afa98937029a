"""F3: PostgreSQL stopped for 10 s under submit load, then started."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.harness import FaultWorld, Submitter, report

OUTAGE_S = 10.0


@pytest.mark.faults
def test_f3_postgres_stopped_under_submit_load(make_world: Callable[..., FaultWorld]) -> None:
    world = make_world()
    world.api()
    key = world.create_key("f3")
    worker = world.worker("f3")
    world.wait_worker("f3", worker)

    submitter = Submitter(world.base_url, key, pause_s=0.05)
    submitter.start()
    time.sleep(3)
    before = len(submitter.accepted)
    world.pg.stop()
    down = time.monotonic()
    time.sleep(OUTAGE_S)
    world.pg.start()
    back = time.monotonic()
    time.sleep(3)
    submitter.stop.set()
    submitter.join(timeout=30)
    assert not submitter.is_alive()

    accepted = submitter.accepted
    outcome, _ = world.wait_terminal(accepted, timeout=60 - (time.monotonic() - back))
    recovery_s = time.monotonic() - back
    statuses: dict[int, int] = {}
    for _, status, _, _ in submitter.answers:
        statuses[status] = statuses.get(status, 0) + 1
    refused = [a for a in submitter.answers if a[1] != 202]
    during = [a for a in submitter.answers if down <= a[0] <= back]
    not_problem = [a for a in refused if a[1] != 503 or "application/problem+json" not in a[2]]
    report(
        "F3",
        len(accepted),
        outcome,
        recovery_s,
        answers=dict(sorted(statuses.items())),
        during_outage=len(during),
        accepted_before=before,
        transport_errors=submitter.transport_errors,
    )
    assert before > 0 and len(accepted) > before, "submissions were accepted around the outage"
    assert any(a[1] == 503 for a in during), "the outage was never seen"
    assert not not_problem, f"answers other than 503 problem+json: {not_problem[:3]}"
    assert submitter.transport_errors == 0
    # Every 202 is a stored job.
    assert outcome.jobs == len(set(accepted)) == len(accepted)
    world.require(outcome.terminal == len(accepted), f"all terminal within 60 s: {outcome}")
    world.require(outcome.succeeded == len(accepted), f"all succeeded: {outcome}")
    assert outcome.duplicate_replies == 0
