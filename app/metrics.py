"""GET /metrics: the API's own metrics, the job counts from the database, and every live
worker's metrics (published to Redis with its heartbeat), labelled with the worker's name."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.db import get_sessionmaker
from app.models import UNFINISHED, Job
from app.redis import get_redis, worker_metrics

log = logging.getLogger("parley.metrics")

JOBS_SUBMITTED = Counter("parley_jobs_submitted_total", "Chat turns accepted (202).")
SUBMIT_GROUP_SIZE = Histogram(
    "parley_submit_group_size",
    "Turns stored together in one transaction by this API process (app.jobs.intake).",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)


class JobsCollector(Collector):
    """Queue depth and running turns, as the database (the source of truth) has them."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "parley_jobs_unfinished", "Jobs queued or running, by status.", labels=["status"]
        )
        counts: dict[str, int] = {status.value: 0 for status in UNFINISHED}
        with get_sessionmaker()() as session:
            for status, count in session.execute(
                select(Job.status, func.count())
                .where(Job.status.in_(UNFINISHED))
                .group_by(Job.status)
            ):
                counts[status] = count
        for status, count in counts.items():
            family.add_metric([status], count)
        yield family


class WorkersCollector(Collector):
    """Each live worker's snapshot, re-labelled with `worker` and merged family by family."""

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, text in worker_metrics(get_redis()).items():
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError:
                log.warning("unreadable metrics snapshot from %s", worker)
                continue
            for family in families:
                target = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    labels = {**sample.labels, "worker": worker}
                    target.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()


_collectors_registered = False


def render() -> bytes:
    global _collectors_registered
    if not _collectors_registered:
        REGISTRY.register(JobsCollector())
        REGISTRY.register(WorkersCollector())
        _collectors_registered = True
    return generate_latest(REGISTRY)
