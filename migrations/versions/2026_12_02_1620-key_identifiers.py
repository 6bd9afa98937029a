"""api keys: what is kept in clear is an identifier, not characters of the secret

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 16:20:00

Keys made from now on carry a public identifier before their secret ("pk_1a2b3c_...": the
identifier is what is stored and listed); a key chosen by its operator is listed by a
fingerprint of its digest ("sha256:1a2b3c"). A stored prefix of an older key is made of the
key's own first characters, so it becomes that fingerprint too: the stored digest's first six
hex digits, which tell nothing the digest did not.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE api_keys SET key_prefix = 'sha256:' || left(key_hash, 6)"
        " WHERE key_prefix !~ '^pk_[0-9a-f]{6}$'"
    )


def downgrade() -> None:
    # The older prefixes were characters of the keys: they are not brought back.
    pass
