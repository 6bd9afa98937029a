"""Tenants' signing secrets, and Standard Webhooks signatures made with `standardwebhooks`."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from app.models import WebhookSecret
from app.models.base import utcnow

# After a rotation the old secret keeps signing alongside the new one for this long.
ROTATION_OVERLAP = timedelta(hours=24)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def tenant_secret(session: Session, *, tenant_id: str, lock: bool = False) -> WebhookSecret:
    """The tenant's secrets, made on first use (concurrent first uses agree on one)."""
    session.execute(
        insert(WebhookSecret)
        .values(tenant_id=tenant_id, secret=new_secret(), created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["tenant_id"])
    )
    query = select(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update()
    return session.execute(query.execution_options(populate_existing=True)).scalar_one()


def rotate(session: Session, *, tenant_id: str) -> WebhookSecret:
    """A new current secret; the old one signs too until ROTATION_OVERLAP has passed. A
    secret that was already the previous one stops signing at once."""
    row = tenant_secret(session, tenant_id=tenant_id, lock=True)
    now = utcnow()
    row.previous_secret = row.secret
    row.previous_expires_at = now + ROTATION_OVERLAP
    row.secret = new_secret()
    row.rotated_at = now
    session.flush()
    return row


def signing_secrets(row: WebhookSecret, *, now: datetime) -> list[str]:
    """The secrets that sign a message sent at `now`: the current one first."""
    keys = [row.secret]
    if row.previous_secret and row.previous_expires_at and row.previous_expires_at > now:
        keys.append(row.previous_secret)
    return keys


def sign_headers(*, message_id: str, body: str, keys: list[str], at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers for `body` sent at `at`: one signature per key."""
    signatures = [Webhook(key).sign(msg_id=message_id, timestamp=at, data=body) for key in keys]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
