"""F12: Redis at maxmemory with context keys: broker messages are never evicted.

`parley dev`'s arrangement (the context cache and the broker on two servers, the broker with
noeviction) keeps every queued turn while the cache evicts; one server with an evicting policy
is what the service warns about (`broker_eviction_risk`, shown in /readyz)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from app import redis as parley_redis
from app.context.store import Context, ContextStore
from app.dev.redis_server import LocalRedis
from app.schemas import ChatMessage
from celeryconfig import TURNS_QUEUE

pytestmark = pytest.mark.faults

QUEUED = 200
EVICTING = {"maxmemory": "2mb", "maxmemory-policy": "allkeys-lru"}


def _fill_context(store: ContextStore, conversations: int) -> None:
    words = "lorem ipsum dolor sit amet " * 80  # about 2 KB a message
    for n in range(conversations):
        messages = [ChatMessage(role="user", content=f"{n} {words}")] * 4
        store.put(f"conv_{n}", Context(upto_turn=2, messages=messages))


def _queue_turns(broker_url: str) -> None:
    client = Celery("f12", broker=broker_url)
    for n in range(QUEUED):
        client.send_task("parley.run_turn", args=[f"job_{n}"], queue=TURNS_QUEUE)


def test_f12_the_broker_keeps_every_queued_turn_while_the_cache_evicts(tmp_path: Path) -> None:
    with (
        LocalRedis(tmp_path / "cache", settings=EVICTING) as cache,
        LocalRedis(tmp_path / "broker", settings={"maxmemory-policy": "noeviction"}) as broker,
    ):
        started = time.monotonic()
        _queue_turns(broker.url)
        cached = redis.Redis.from_url(cache.url)
        store = ContextStore(cached, ttl_seconds=3600, max_messages=200)
        _fill_context(store, conversations=4000)  # about 32 MB into 2 MB
        evicted = int(cached.info("stats")["evicted_keys"])
        queued = int(redis.Redis.from_url(broker.url).llen(TURNS_QUEUE))
        print(
            f"FAULT F12 queued={QUEUED} still_queued={queued} cache_keys={cached.dbsize()} "
            f"cache_evicted={evicted} seconds={time.monotonic() - started:.1f}"
        )
        assert evicted > 0  # the cache was at its limit and gave way
        assert queued == QUEUED  # the broker lost nothing
        # What the cache kept is whole or missing, never half a context (then rebuilt).
        kept = [store.get(f"conv_{n}") for n in range(4000)]
        assert {len(c.messages) for c in kept if c is not None} <= {4}
        assert any(c is None for c in kept) and any(c is not None for c in kept)


def test_f12_an_evicting_broker_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        LocalRedis(tmp_path / "shared", settings=EVICTING) as shared,
        LocalRedis(tmp_path / "broker", settings={"maxmemory-policy": "noeviction"}) as broker,
    ):
        for url, risky in ((shared.url, True), (broker.url, False)):
            client = redis.Redis.from_url(url, decode_responses=True)
            monkeypatch.setattr(parley_redis, "get_broker_redis", lambda c=client: c)
            risk = parley_redis.broker_eviction_risk()
            assert (risk is not None) is risky, (url, risk)
        assert risk is None
        monkeypatch.setattr(
            parley_redis, "get_broker_redis", lambda: redis.Redis.from_url(shared.url)
        )
        assert "allkeys-lru" in (parley_redis.broker_eviction_risk() or "")
