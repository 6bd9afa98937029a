"""jobs: fair share between tenants (a job's ready time, and the indexes dispatch reads)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 09:10:00

A job is *ready* once it is its conversation's next; it is *sent* once its message is in the
broker. A tenant has a bounded number of ready jobs sent and waiting at once; its other ready
jobs wait in PostgreSQL, in ready order, and are sent as the earlier ones start
(app.jobs.lifecycle, app.jobs.fair_share). Every queued job sent so far was ready when it was
sent, so that time stands for its ready time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET ready_at = enqueued_at WHERE enqueued_at IS NOT NULL")
    # A queued job that is its conversation's next but was never sent (its API process died
    # between the commit and the publish) is ready: held, so that the reconciler sends it.
    op.execute(
        "UPDATE jobs SET ready_at = created_at"
        " WHERE status = 'queued' AND enqueued_at IS NULL AND NOT EXISTS ("
        "SELECT 1 FROM jobs AS earlier WHERE earlier.conversation_id = jobs.conversation_id"
        " AND earlier.turn < jobs.turn AND earlier.status IN ('queued', 'running'))"
    )
    op.create_index(
        "ix_jobs_sent",
        "jobs",
        ["tenant_id", "enqueued_at"],
        postgresql_where=sa.text("status = 'queued' AND enqueued_at IS NOT NULL"),
    )
    op.create_index(
        "ix_jobs_held",
        "jobs",
        ["tenant_id", "ready_at"],
        postgresql_where=sa.text(
            "status = 'queued' AND enqueued_at IS NULL AND ready_at IS NOT NULL"
        ),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_held", table_name="jobs")
    op.drop_index("ix_jobs_sent", table_name="jobs")
    op.drop_column("jobs", "ready_at")
