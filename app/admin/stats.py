"""Operational figures: jobs per status, queue depth, workers, queue wait and run time."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import ColumnElement, extract, func, select
from sqlalchemy.orm import Session

from app.admin.schemas import JobStats, Percentiles, StatsOut, TenantStats
from app.models import Job, JobStatus
from app.models.base import utcnow

WINDOW = timedelta(hours=1)
_NONE = Percentiles(p50=None, p95=None, count=0)


@dataclass
class _Figures:
    jobs: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in JobStatus})
    queue_wait: Percentiles = field(
        default_factory=lambda: Percentiles(p50=None, p95=None, count=0)
    )
    run_time: Percentiles = field(default_factory=lambda: Percentiles(p50=None, p95=None, count=0))

    def out(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "queue_depth": self.jobs[JobStatus.queued],
            "queue_wait_seconds": self.queue_wait,
            "run_time_seconds": self.run_time,
        }


def _percentiles(
    session: Session, seconds: ColumnElement[Any], *conditions: ColumnElement[bool]
) -> dict[str | None, Percentiles]:
    """p50 and p95 of `seconds` per tenant, and over all tenants (key None), in SQL."""
    rows = session.execute(
        select(
            Job.tenant_id,
            func.percentile_cont(0.5).within_group(seconds),
            func.percentile_cont(0.95).within_group(seconds),
            func.count(),
        )
        .where(*conditions)
        .group_by(func.rollup(Job.tenant_id))
    ).all()
    return {
        tenant: Percentiles(p50=_round(p50), p95=_round(p95), count=count)
        for tenant, p50, p95, count in rows
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def collect_stats(
    session: Session, *, workers_alive: int, broker_queue_length: int | None
) -> StatsOut:
    now = utcnow()
    since: datetime = now - WINDOW
    figures: dict[str | None, _Figures] = {None: _Figures()}
    counts = session.execute(
        select(Job.tenant_id, Job.status, func.count()).group_by(Job.tenant_id, Job.status)
    ).all()
    for tenant, status, count in counts:
        for key in (tenant, None):
            jobs = figures.setdefault(key, _Figures()).jobs
            jobs[status] = jobs.get(status, 0) + count
    waits = _percentiles(
        session, extract("epoch", Job.started_at - Job.created_at), Job.started_at >= since
    )
    runs = _percentiles(
        session,
        extract("epoch", Job.finished_at - Job.started_at),
        Job.finished_at >= since,
        Job.started_at.is_not(None),
    )
    for key, value in waits.items():
        figures.setdefault(key, _Figures()).queue_wait = value
    for key, value in runs.items():
        figures.setdefault(key, _Figures()).run_time = value
    total = figures.pop(None)
    return StatsOut(
        generated_at=now,
        window_seconds=int(WINDOW.total_seconds()),
        workers_alive=workers_alive,
        broker_queue_length=broker_queue_length,
        total=JobStats(**total.out()),
        tenants=[
            TenantStats(tenant=tenant, **figures[tenant].out())
            for tenant in sorted(t for t in figures if t is not None)
        ],
    )


def broker_queue_length(broker_url: str, queue: str) -> int | None:
    """Messages waiting in the broker's list for `queue` (Celery's Redis transport)."""
    try:
        client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        with client:
            return int(client.llen(queue))
    except (redis.RedisError, ValueError):
        return None
