"""The worker's metrics: the engine at work and the turns it ran.

A worker's metrics reach the API's /metrics through Redis (its heartbeat, heartbeat.py,
publishes a snapshot each time), so one scrape of the API shows every worker.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from worker.inference.engine_types import PrefixCacheCounts, StepStats

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RUNNING_TURNS = Gauge(
    "parley_worker_running_turns", "Turns in the worker's batch right now.", registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "parley_worker_batch_size",
    "Turns advanced together by one decoding step.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "parley_worker_step_seconds",
    "Duration of one decoding step of the whole batch.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter(
    "parley_worker_generated_tokens",
    "Tokens generated; rate() of it is the worker's tokens per second.",
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "parley_worker_time_to_first_token_seconds",
    "From a turn reaching the engine to its first generated token.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "parley_turn_queue_wait_seconds",
    "From a job's acceptance to its start on a worker.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
RUN_TIME = Histogram(
    "parley_turn_run_seconds",
    "From a job's start on a worker to its end.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TURNS_ENDED = Counter(
    "parley_turns_ended", "Turns ended by this worker, by status.", ["status"], registry=REGISTRY
)


class PrefixCacheCollector(Collector):
    """The engine's prefix cache (worker/inference/prefix_cache.py): lookups that found the
    conversation's last turn, those that did not, and the prompt tokens it saved prefilling."""

    def __init__(self, cache: PrefixCacheCounts) -> None:
        self._cache = cache

    def collect(self) -> Iterator[CounterMetricFamily]:
        cache = self._cache
        for name, help_text, value in (
            (
                "parley_worker_prefix_cache_hits",
                "Prompts that reused a kept cache.",
                cache.hits,
            ),
            ("parley_worker_prefix_cache_misses", "Prompts prefilled whole.", cache.misses),
            (
                "parley_worker_prefix_cache_reused_tokens",
                "Prompt tokens served from kept caches instead of prefilled.",
                cache.reused_tokens,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)


def observe_prefix_cache(cache: PrefixCacheCounts) -> None:
    REGISTRY.register(PrefixCacheCollector(cache))


def observe_step(stats: StepStats) -> None:
    BATCH_SIZE.observe(stats.batch_size)
    STEP_SECONDS.observe(stats.seconds)
    GENERATED_TOKENS.inc(stats.batch_size)


def snapshot() -> bytes:
    """The worker's metrics in Prometheus text format."""
    return generate_latest(REGISTRY)
