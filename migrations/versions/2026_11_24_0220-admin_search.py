"""admin search: full-text and trigram indexes on messages, list and stats indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 02:10:00

pg_trgm is a trusted extension (PostgreSQL 13+): a database owner may create it. Its
operator class is named with the schema the extension lives in, so that the index is built
whatever the migration's search_path (the extension may already exist in another schema).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    trgm_schema = (
        op.get_bind()
        .exec_driver_sql(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname = 'pg_trgm'"
        )
        .scalar_one()
    )
    quoted = op.get_bind().dialect.identifier_preparer.quote_identifier(trgm_schema)
    # English word forms ("Running" finds "run"), quoted phrases.
    op.execute(
        "CREATE INDEX ix_messages_content_fts ON messages"
        " USING gin (to_tsvector('english'::regconfig, content))"
    )
    # Substrings, for scripts written without spaces (Chinese, Japanese, Thai...).
    op.execute(
        f"CREATE INDEX ix_messages_content_trgm ON messages USING gin (content {quoted}.gin_trgm_ops)"
    )
    op.create_index("ix_conversations_created", "conversations", ["created_at", "id"])
    op.create_index("ix_jobs_started_at", "jobs", ["started_at"])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_index("ix_jobs_started_at", table_name="jobs")
    op.drop_index("ix_conversations_created", table_name="conversations")
    op.drop_index("ix_messages_content_trgm", table_name="messages")
    op.drop_index("ix_messages_content_fts", table_name="messages")
    # pg_trgm stays: other objects may use it, and dropping an extension needs more rights.
