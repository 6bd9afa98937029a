"""F5: a turn that outlives its lease (and the time a broker would wait before redelivering
its message): the heartbeat renews the lease while it runs, and a redelivered copy of its
message stores nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import pytest
from celery import Celery

from app.config import Settings
from app.dev.stack import ROOT, ensure_model
from celeryconfig import celery_config
from tests.faults.harness import FaultWorld, report

LEASE_S = 3
# The small model (GPT-2 small's shape) makes about 30 tokens a second on one CPU thread:
# the turn runs for several leases.
NEW_TOKENS = 400


@pytest.mark.faults
def test_f5_turn_outlives_its_lease(make_world: Callable[..., FaultWorld]) -> None:
    model = ensure_model(ROOT / ".parley" / "test" / "models" / "small", size="small")
    world = make_world(MODEL_ID=str(model), TURN_LEASE_SECONDS=str(LEASE_S))
    world.api()
    key = world.create_key("f5")
    worker = world.worker("f5")
    world.wait_worker("f5", worker)
    # After the reconciler's first round, which sends every queued job again on a new broker:
    # the only copy of the message is then the one this test sends.
    world.wait_broker_marker()
    job_id = world.submit(key, "Tell me a long story.", generation={"max_new_tokens": NEW_TOKENS})[
        "id"
    ]

    leases: list[tuple[datetime, datetime]] = []  # (lease_expires_at, the database's now())
    duplicate_sent = False
    log_offset = 0
    claimed_at: float | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with world.db() as conn:
            row = conn.execute(
                "SELECT status, lease_expires_at, now() FROM jobs WHERE id = %s", [job_id]
            ).fetchone()
        assert row is not None
        status, lease, now = row
        if status != "running" and claimed_at is not None:
            break
        if status == "running":
            claimed_at = claimed_at or time.monotonic()
            leases.append((lease, now))
            if not duplicate_sent and time.monotonic() - claimed_at > LEASE_S + 1.5:
                # The redelivered copy of its message, as a broker sends it again.
                log_offset = world.log.stat().st_size
                _send_duplicate(world, job_id)
                duplicate_sent = True
        time.sleep(0.25)
    ran_s = time.monotonic() - (claimed_at or time.monotonic())

    outcome, _ = world.wait_terminal([job_id], timeout=30)
    with world.db() as conn:
        row = conn.execute(
            "SELECT attempts, completion_tokens FROM jobs WHERE id = %s", [job_id]
        ).fetchone()
    assert row is not None
    attempts, tokens = row
    with world.log.open("rb") as log:
        log.seek(log_offset)
        after = log.read().decode(errors="replace").splitlines()
    refused = [line for line in after if f"job_id={job_id} not claimable" in line]
    distinct_leases = len({lease for lease, _ in leases})
    expired_samples = sum(1 for lease, now in leases if lease is None or lease <= now)
    report(
        "F5",
        1,
        outcome,
        0.0,
        ran_s=f"{ran_s:.1f}",
        attempts=attempts,
        tokens=tokens,
        lease_values=distinct_leases,
        expired_samples=expired_samples,
        duplicate_refused=len(refused),
    )
    assert duplicate_sent, "the turn ended before its lease would have run out"
    assert ran_s > 2 * LEASE_S
    world.require(outcome.succeeded == 1, f"it succeeded: {outcome}")
    assert attempts == 1
    assert outcome.duplicate_replies == 0
    # Renewed while it ran, and never out of date.
    assert distinct_leases >= ran_s / 2
    assert expired_samples == 0
    assert len(refused) == 1, "the copy was not refused at its claim"


def _send_duplicate(world: FaultWorld, job_id: str) -> None:
    assert world.stack is not None
    settings = Settings(
        _env_file=None,
        database_url=world.database_url,
        redis_url=world.stack.env["REDIS_URL"],
        broker_url=world.stack.env["BROKER_URL"],
    )
    client = Celery("f5-duplicate")
    client.conf.update(celery_config(settings))
    try:
        client.send_task("parley.run_turn", args=[job_id])
    finally:
        client.close()
