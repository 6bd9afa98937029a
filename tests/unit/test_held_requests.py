"""A key's held requests are counted once each: taken at once or refused, released once."""

from __future__ import annotations

import gc

from app.jobs.waiter import JobWaiter


def test_a_key_holds_at_most_its_limit_and_each_hold_is_released_once() -> None:
    waiter = JobWaiter("redis://127.0.0.1:1/0")  # never started: no Redis needed
    first, second = waiter.reserve("key", 2), waiter.reserve("key", 2)
    assert first is not None and second is not None
    assert waiter.reserve("key", 2) is None  # refused, and counted nowhere
    assert waiter.reserve("other", 2) is not None  # another key has its own room
    first.release()
    first.release()  # a second release gives back nothing more
    third = waiter.reserve("key", 2)
    assert third is not None and waiter.reserve("key", 2) is None


def test_a_hold_dropped_unreleased_is_given_back() -> None:
    # A stream whose client left before it started never runs its own release.
    waiter = JobWaiter("redis://127.0.0.1:1/0")
    assert waiter.reserve("key", 1) is not None  # dropped at once
    gc.collect()
    with waiter.hold("key", 1) as held:
        assert held
        assert waiter.reserve("key", 1) is None
    assert waiter.reserve("key", 1) is not None
