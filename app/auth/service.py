"""API keys: issued once, stored as SHA-256 digests, looked up by digest."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.ids import new_id
from app.models import ApiKey, Scope, Tenant
from app.models.base import utcnow

KEY_PREFIX = "pk_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key, its tenant and its scope."""

    key_id: str
    tenant_id: str
    scope: Scope

    @property
    def is_admin(self) -> bool:
        return self.scope is Scope.admin

    @property
    def readable_tenant(self) -> str | None:
        """The tenant whose objects this key may read by id; None: every tenant (operators)."""
        return None if self.is_admin else self.tenant_id


def hash_key(secret: str) -> str:
    # Keys are 256-bit random values, so a fast digest is enough: there is nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


# A key Parley makes is "pk_", its public identifier (6 hex digits), "_" and 256 random bits:
# the identifier, kept and listed in clear so that operators can tell keys apart, is not part
# of the secret. A key chosen by its operator (PARLEY_ADMIN_KEY) has no identifier: it is
# shown as a fingerprint of its digest, which tells none of its characters.
_PUBLIC_ID_HEX = 6
_MADE_KEY = re.compile(rf"({re.escape(KEY_PREFIX)}[0-9a-f]{{{_PUBLIC_ID_HEX}}})_[\w-]{{43}}")


def shown_prefix(secret: str) -> str:
    made = _MADE_KEY.fullmatch(secret)
    if made is not None:
        return made.group(1)
    return "sha256:" + hash_key(secret)[:_PUBLIC_ID_HEX]


def generate_secret() -> str:
    return f"{KEY_PREFIX}{secrets.token_hex(_PUBLIC_ID_HEX // 2)}_{secrets.token_urlsafe(32)}"


def ensure_tenant(session: Session, *, tenant_id: str) -> None:
    session.execute(insert(Tenant).values(id=tenant_id).on_conflict_do_nothing())


def create_key(
    session: Session, *, tenant_id: str, scope: Scope, name: str = "", secret: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the secret, which is never retrievable again."""
    ensure_tenant(session, tenant_id=tenant_id)
    secret = secret or generate_secret()
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        scope=scope.value,
        name=name,
        key_hash=hash_key(secret),
        key_prefix=shown_prefix(secret),
    )
    session.add(key)
    session.flush()
    return key, secret


_KEY_LOOKUP = """
SELECT id, tenant_id, scope FROM api_keys WHERE key_hash = %(hash)s AND revoked_at IS NULL
"""


async def authenticate(conn: AsyncConnection[TupleRow], *, secret: str) -> Principal | None:
    """The key's principal, or None when it is unknown or revoked: one indexed read, on the
    API's async pool (every request makes it)."""
    found = await conn.execute(_KEY_LOOKUP, {"hash": hash_key(secret)})
    row = await found.fetchone()
    if row is None:
        return None
    key_id, tenant_id, scope = row
    return Principal(key_id=key_id, tenant_id=tenant_id, scope=Scope(scope))


def revoke_key(session: Session, *, key_id: str) -> bool:
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


BOOTSTRAP_TENANT = "operator"


def ensure_bootstrap_admin(session: Session, *, secret: str) -> None:
    """Make `PARLEY_ADMIN_KEY` a valid admin key (idempotent, safe from several processes)."""
    ensure_tenant(session, tenant_id=BOOTSTRAP_TENANT)
    session.execute(
        insert(ApiKey)
        .values(
            id=new_id("key"),
            tenant_id=BOOTSTRAP_TENANT,
            scope=Scope.admin.value,
            name="PARLEY_ADMIN_KEY",
            key_hash=hash_key(secret),
            key_prefix=shown_prefix(secret),
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["key_hash"])
    )
