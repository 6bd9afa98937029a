from __future__ import annotations

from fastapi import APIRouter

from app.deps import CurrentKey, SessionDep
from app.webhooks import signing
from app.webhooks.schemas import WebhookSecretOut

router = APIRouter(prefix="/v1", tags=["webhooks"])


@router.get("/webhook-secret", response_model=WebhookSecretOut)
def read_secret(principal: CurrentKey, session: SessionDep) -> WebhookSecretOut:
    """The tenant's signing secret (`whsec_...`), made on first use. Verify webhooks with it."""
    row = signing.tenant_secret(session, tenant_id=principal.tenant_id)
    session.commit()
    return WebhookSecretOut(secret=row.secret)


@router.post("/webhook-secret/rotate", response_model=WebhookSecretOut)
def rotate_secret(principal: CurrentKey, session: SessionDep) -> WebhookSecretOut:
    """A new signing secret. The old one keeps signing alongside it for 24 hours (both
    signatures are sent), then stops; rotating again within them retires it at once."""
    row = signing.rotate(session, tenant_id=principal.tenant_id)
    session.commit()
    return WebhookSecretOut(secret=row.secret)
