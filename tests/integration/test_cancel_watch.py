"""The worker's cancel watch against a real Redis: one read serves every watched turn."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import redis

from app.redis import request_cancel
from worker.turn_worker.cancel_watch import CancelWatch


def _until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_cancel_reaches_its_turn_and_no_other(redis_client: redis.Redis) -> None:
    watch = CancelWatch(redis_client, interval_s=0.02)
    first, second = (f"job_{secrets.token_hex(6)}" for _ in range(2))
    with watch.watching(first) as first_cancelled, watch.watching(second) as second_cancelled:
        assert not first_cancelled() and not second_cancelled()
        request_cancel(redis_client, first)
        assert _until(first_cancelled), "the cancel signal was never read"
        time.sleep(0.1)  # several reads later, the other turn is still not cancelled
        assert not second_cancelled()


def test_a_turn_cancelled_before_it_is_watched_starts_cancelled(
    redis_client: redis.Redis,
) -> None:
    watch = CancelWatch(redis_client, interval_s=60)  # no periodic read within the test
    job = f"job_{secrets.token_hex(6)}"
    request_cancel(redis_client, job)
    with watch.watching(job) as cancelled:
        assert cancelled()


def test_with_redis_away_a_turn_is_not_cancelled() -> None:
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    watch = CancelWatch(away, interval_s=0.02)
    with watch.watching("job_x") as cancelled:
        time.sleep(0.1)
        assert not cancelled()
