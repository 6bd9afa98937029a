from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.models.base import CreatedAt, one_of


class WebhookStatus(enum.StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class WebhookEvent(CreatedAt, Base):
    """One job end to tell a webhook about: written in the job end's transaction, at most one
    per job (unique job_id), its payload frozen then. The delivery schedule lives here, so
    retries survive any worker or broker restart."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        one_of("status", WebhookStatus),
        # The sweep's scan for due attempts.
        Index(
            "ix_webhook_events_due",
            "next_attempt_at",
            postgresql_where=text(f"status = '{WebhookStatus.pending.value}'"),
        ),
        # The fair sweep's scan: each tenant's earliest due attempts (migration 0006).
        Index(
            "ix_webhook_events_due_tenant",
            "tenant_id",
            "next_attempt_at",
            postgresql_where=text(f"status = '{WebhookStatus.pending.value}'"),
        ),
    )

    # `evt_...`: the Standard Webhooks `webhook-id`, the same on every attempt.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    type: Mapped[str] = mapped_column(String(32))
    # JSON, not JSONB: the body is sent with the keys in the order they were written.
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=WebhookStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts made before the current round of retries (a redelivery starts a new round).
    round_start: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due; null once delivered or failed.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set while an attempt is in flight: another worker may not start one before it expires.
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When a message for the due attempt was last sent to the broker.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the webhook was last redelivered on request (at most once per
    # WEBHOOK_REDELIVER_INTERVAL_SECONDS).
    redelivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
