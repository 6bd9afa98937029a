from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from app.conversations.schemas import ConversationOut, MessageOut
from app.jobs.schemas import JobOut

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ConversationSummary(BaseModel):
    id: str
    tenant: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    last_job_status: JobStatusName | None
    # With `q`: an excerpt of the first matching message, each match wrapped in `**`.
    snippet: str | None


class AdminConversationOut(ConversationOut):
    tenant: str
    messages: list[MessageOut]
    jobs: list[JobOut]


class Percentiles(BaseModel):
    p50: float | None
    p95: float | None
    # Jobs the figures are taken over.
    count: int


class JobStats(BaseModel):
    jobs: dict[JobStatusName, int]
    # Jobs waiting for a worker (status queued).
    queue_depth: int
    # Seconds from submission to the start of the run, of jobs started in the window.
    queue_wait_seconds: Percentiles
    # Seconds from the start to the end of the run, of jobs finished in the window.
    run_time_seconds: Percentiles


class TenantStats(JobStats):
    tenant: str


class StatsOut(BaseModel):
    generated_at: datetime
    window_seconds: int
    workers_alive: int
    # Messages waiting in the broker's turn queue; null when the broker cannot be reached.
    broker_queue_length: int | None
    total: JobStats
    tenants: list[TenantStats]
