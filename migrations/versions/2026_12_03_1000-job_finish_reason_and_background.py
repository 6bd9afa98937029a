"""jobs: why generation ended, and whether a response was asked for in the background

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 10:00:00

`finish_reason` (stop, length, time, cancelled) is stored with a turn's end: the Responses
API tells an `incomplete` response (cut by max_output_tokens) from a `completed` one.
`background` is what a `POST /v1/responses` asked for, shown back on the response (NULL for
jobs submitted through /v1/jobs). Both are nullable, so adding them rewrites no row.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("finish_reason", sa.String(16), nullable=True))
    op.add_column("jobs", sa.Column("background", sa.Boolean(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "background")
    op.drop_column("jobs", "finish_reason")
