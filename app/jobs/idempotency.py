"""`Idempotency-Key`: a repeat within 24 hours returns the first answer.

The key's row is committed before the work starts, so a concurrent repeat finds it at once
and is answered 409 rather than blocking on the first request's transaction; the submit's
transaction records its job there (app.jobs.repository.IDEMPOTENCY_DONE).
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.errors import ProblemError
from app.models import IdempotencyKey
from app.models.base import utcnow

KEY_LIFETIME = timedelta(hours=24)
# A first request that has held its key this long without finishing has died mid-way.
# Far longer than any request can take (database and DNS timeouts are seconds), so a slow
# first request is never taken over by its repeat.
ABANDONED_AFTER = timedelta(minutes=10)


def request_fingerprint(body: BaseModel) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def begin(session: Session, *, tenant_id: str, key: str, fingerprint: str) -> str | None:
    """Reserve `key` for this request and commit. Returns the job id of an earlier identical
    request, or None when this request is to do the work."""
    now = utcnow()
    inserted = session.execute(
        insert(IdempotencyKey)
        .values(tenant_id=tenant_id, key=key, request_hash=fingerprint, created_at=now)
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    ).first()
    if inserted is not None:
        session.commit()
        return None
    row = session.execute(
        select(IdempotencyKey)
        .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
        .with_for_update()
    ).scalar_one()
    expired = row.created_at < now - KEY_LIFETIME
    abandoned = row.job_id is None and row.created_at < now - ABANDONED_AFTER
    if expired or abandoned:
        row.request_hash, row.job_id, row.created_at = fingerprint, None, now
        session.commit()
        return None
    if row.request_hash != fingerprint:
        session.rollback()
        raise ProblemError(
            422,
            "This Idempotency-Key was already used with a different request body.",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "reused with another body"}],
        )
    job_id = row.job_id
    session.rollback()
    if job_id is None:
        raise ProblemError(409, "A request with this Idempotency-Key is still being handled.")
    return job_id


def release(session: Session, *, tenant_id: str, key: str) -> None:
    """The request failed: free the key so that the client may retry with it."""
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            IdempotencyKey.job_id.is_(None),
        )
    )
    session.commit()
