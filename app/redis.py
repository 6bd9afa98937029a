"""Redis: the recent-context cache, cancel flags, job-end notices and worker heartbeats.

The broker has its own database (see `Settings.celery_broker_url`), so nothing here can
evict or touch a broker message.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from urllib.parse import urlsplit

import redis

from app import job_events
from app.config import Settings, get_settings

log = logging.getLogger("parley.redis")

JOB_ENDED_CHANNEL = "parley:job-ended"
WORKERS_KEY = "parley:workers"
# A worker that has not reported for this long is presumed gone (/readyz).
WORKER_STALE_SECONDS = 30


@lru_cache
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


@lru_cache
def get_broker_redis() -> redis.Redis:
    """The broker's Redis (BROKER_URL, or REDIS_URL's next database), for what Parley keeps
    beside Celery's queues there and for checking its eviction policy."""
    return redis.Redis.from_url(
        get_settings().celery_broker_url,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=5,
    )


def cancel_key(job_id: str) -> str:
    return f"parley:cancel:{job_id}"


def request_cancel(client: redis.Redis, job_id: str) -> None:
    client.set(cancel_key(job_id), "1", ex=24 * 3600)


def cancel_requested(client: redis.Redis, job_id: str) -> bool:
    return bool(client.exists(cancel_key(job_id)))


def announce_job_ended(client: redis.Redis, job_id: str) -> None:
    """Wake `Prefer: wait` requests holding for this job, and end its event stream's readers,
    in one round trip."""
    pipe = client.pipeline(transaction=False)
    queue_job_ended(pipe, job_id)
    pipe.execute()


def queue_job_ended(pipe: redis.client.Pipeline, job_id: str) -> None:
    """announce_job_ended, as commands of `pipe`: the job's stream ends (app.job_events),
    then the notice that wakes held requests."""
    job_events.append(pipe, job_id, "end")
    pipe.publish(JOB_ENDED_CHANNEL, job_id)


def report_worker_alive(client: redis.Redis, name: str) -> None:
    now = time.time()
    pipe = client.pipeline()
    pipe.zadd(WORKERS_KEY, {name: now})
    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - 24 * 3600)
    pipe.execute()


def _metrics_key(name: str) -> str:
    return f"parley:metrics:{name}"


def publish_worker_metrics(client: redis.Redis, name: str, text: bytes) -> None:
    """A worker's metrics snapshot, for the API's /metrics; gone when the worker is."""
    client.set(_metrics_key(name), text, ex=WORKER_STALE_SECONDS * 2)


def worker_metrics(client: redis.Redis) -> dict[str, str]:
    """The latest snapshot of every live worker, by worker name."""
    keys = list(client.scan_iter(_metrics_key("*"), count=100))
    values = client.mget(keys) if keys else []
    prefix = len(_metrics_key(""))
    return {str(k)[prefix:]: str(v) for k, v in zip(keys, values, strict=True) if v is not None}


def workers_alive(client: redis.Redis) -> int:
    return int(client.zcount(WORKERS_KEY, time.time() - WORKER_STALE_SECONDS, "+inf"))


def broker_eviction_risk() -> str | None:
    """Why the broker's Redis could evict queued turns (reliability F12), or None: a memory
    limit with an eviction policy other than noeviction drops keys, broker messages among
    them. None too when the server will not say (managed Redis often disables CONFIG)."""
    try:
        config = get_broker_redis().config_get("maxmemory*")
    except redis.RedisError:
        return None
    policy = config.get("maxmemory-policy", "noeviction")
    if policy == "noeviction" or config.get("maxmemory", "0") == "0":
        return None
    return (
        f"the broker's Redis has maxmemory {config['maxmemory']} and maxmemory-policy {policy}: "
        "it may evict queued turns; give the broker a Redis of its own with noeviction"
    )


def broker_shares_cache_server(settings: Settings) -> bool:
    """True when the broker is a database of REDIS_URL's server: one memory limit and one
    eviction policy for the context cache and the queued turns."""
    cache, broker = urlsplit(settings.redis_url), urlsplit(settings.celery_broker_url)
    return (cache.hostname, cache.port) == (broker.hostname, broker.port)


def warn_about_the_broker(settings: Settings) -> None:
    """Say at start what puts queued turns at risk: a broker sharing the cache's server, or
    one that may evict."""
    if broker_shares_cache_server(settings):
        log.warning(
            "the broker is a database of REDIS_URL's server (%s): the context cache and the "
            "queued turns share one memory limit and eviction policy; in production set "
            "BROKER_URL to a Redis of its own with maxmemory-policy noeviction",
            settings.celery_broker_url.rsplit("@", 1)[-1],
        )
    risk = broker_eviction_risk()
    if risk is not None:
        log.warning("%s", risk)
