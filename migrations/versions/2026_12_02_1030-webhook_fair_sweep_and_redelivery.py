"""webhook_events: the time of the last redelivery on request, and the index of the fair sweep

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:30:00

`redelivered_at`: a job's webhook is redelivered on request at most once per
WEBHOOK_REDELIVER_INTERVAL_SECONDS (app.webhooks.events.redeliver). `ix_webhook_events_due_tenant`:
the delivery sweep takes each tenant's earliest due attempts (worker.io_worker.delivery.sweep_due),
one index probe per tenant instead of a scan of every due attempt.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "webhook_events", sa.Column("redelivered_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_webhook_events_due_tenant",
        "webhook_events",
        ["tenant_id", "next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_events_due_tenant", table_name="webhook_events")
    op.drop_column("webhook_events", "redelivered_at")
