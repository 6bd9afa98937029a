from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.models.base import CreatedAt, PydanticJSONB, one_of, sql_list
from app.schemas import GenerationSettings


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


UNFINISHED = (JobStatus.queued, JobStatus.running)
TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Job(CreatedAt, Base):
    """One chat turn, processed asynchronously."""

    __tablename__ = "jobs"
    __table_args__ = (
        one_of("status", JobStatus),
        # Acceptance order inside a conversation.
        UniqueConstraint("conversation_id", "turn", name="uq_jobs_conversation_turn"),
        # queue_position counts the queued jobs ahead of one.
        Index(
            "ix_jobs_queued_order",
            "created_at",
            "id",
            postgresql_where=text(f"status = '{JobStatus.queued.value}'"),
        ),
        # The per-tenant limit on unfinished jobs, and the reconciler's scans.
        Index(
            "ix_jobs_unfinished_tenant",
            "tenant_id",
            postgresql_where=text(f"status IN ({sql_list(UNFINISHED)})"),
        ),
        # Admin stats over the last hour (migration 0003). Status changes already make job
        # updates non-HOT, so these cost little more on writes.
        # Fair share (migration 0005): a tenant's sent jobs still waiting in the broker...
        Index(
            "ix_jobs_sent",
            "tenant_id",
            "enqueued_at",
            postgresql_where=text(
                f"status = '{JobStatus.queued.value}' AND enqueued_at IS NOT NULL"
            ),
        ),
        # ...and its ready jobs held back in PostgreSQL, in the order they are sent.
        Index(
            "ix_jobs_held",
            "tenant_id",
            "ready_at",
            postgresql_where=text(
                f"status = '{JobStatus.queued.value}' AND enqueued_at IS NULL "
                "AND ready_at IS NOT NULL"
            ),
        ),
        Index("ix_jobs_started_at", "started_at"),
        Index("ix_jobs_finished_at", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    turn: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued)
    generation: Mapped[GenerationSettings] = mapped_column(PydanticJSONB(GenerationSettings))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    context_messages: Mapped[int | None] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    # Why generation ended (stop, length, time, cancelled; migration 0009).
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    # As a POST /v1/responses asked (None: submitted through /v1/jobs).
    background: Mapped[bool | None] = mapped_column(Boolean)
    # Claims so far; a turn that keeps failing ends `failed` after the configured maximum.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Set at each claim: only the claimant may store the end, so a redelivered copy stores nothing.
    claim_token: Mapped[str | None] = mapped_column(String(32))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Ready: the job became its conversation's next. Sent (enqueued_at): its message went to
    # the broker, at once or, past its tenant's fair share, when an earlier one started.
    ready_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
