from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.models.base import CreatedAt, one_of


class Scope(enum.StrEnum):
    client = "client"
    admin = "admin"


class ApiKey(CreatedAt, Base):
    """An API key, stored only as the SHA-256 of its secret value."""

    __tablename__ = "api_keys"
    __table_args__ = (one_of("scope", Scope),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the key, so that an operator can tell keys apart in a list.
    key_prefix: Mapped[str] = mapped_column(String(16))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
