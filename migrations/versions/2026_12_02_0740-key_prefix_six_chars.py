"""api keys: keep six characters of each key in clear, not twelve

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 07:40:00

Twelve characters of a 20-character admin key left only eight secret at rest. Keys made from
now on keep six (app.auth.service.SHOWN_PREFIX_CHARS); this cuts the stored ones to match.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE api_keys SET key_prefix = left(key_prefix, 6) WHERE length(key_prefix) > 6")


def downgrade() -> None:
    # The cut characters are gone; the shorter prefixes stay.
    pass
