from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.models.base import CreatedAt


class WebhookSecret(CreatedAt, Base):
    """A tenant's webhook signing secret (`whsec_` + base64 of 32 random bytes), made on first
    use. Kept in clear: signing needs the key itself, not a hash of it. After a rotation the
    previous secret signs alongside the new one until `previous_expires_at`."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    secret: Mapped[str] = mapped_column(String(64))
    previous_secret: Mapped[str | None] = mapped_column(String(64))
    previous_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
