from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.models.base import CreatedAt


class Message(CreatedAt, Base):
    """A transcript entry. `seq` is 2*turn-1 for the user's message and 2*turn for the reply,
    so the transcript reads in turn order whenever each was written, and a turn can never
    store two replies (the unique key)."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_messages_conversation_seq"),
        CheckConstraint("role IN ('user', 'assistant')", name="role"),
        # Admin search (app/admin/search.py): English word forms, and substrings for scripts
        # written without spaces. Created by migration 0003 with pg_trgm.
        Index(
            "ix_messages_content_fts",
            func.to_tsvector(literal_column("'english'::regconfig"), literal_column("content")),
            postgresql_using="gin",
        ),
        Index(
            "ix_messages_content_trgm",
            "content",
            postgresql_using="gin",
            postgresql_ops={"content": "gin_trgm_ops"},
        ),
        # One- and two-character terms of those scripts (migration 0007).
        Index(
            "ix_messages_content_unspaced_grams",
            func.unspaced_grams(literal_column("content")),
            postgresql_using="gin",
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)


def user_seq(turn: int) -> int:
    return 2 * turn - 1


def reply_seq(turn: int) -> int:
    return 2 * turn


def reply_message_id(job_id: str) -> str:
    """The id of a job's reply: one per job, so a turn run twice cannot store two."""
    return f"msg_{job_id.removeprefix('job_')}r"
