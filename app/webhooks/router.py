from __future__ import annotations

from fastapi import APIRouter

from app.deps import CurrentKey, SessionDep
from app.jobs import service as jobs
from app.jobs.schemas import WebhookState
from app.pagination import CursorQuery, LimitQuery, Page
from app.webhooks import events, signing
from app.webhooks.schemas import WebhookAttemptOut, WebhookSecretOut

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


@router.get("/jobs/{job_id}/webhook-deliveries", response_model=Page[WebhookAttemptOut])
def list_deliveries(
    job_id: str,
    principal: CurrentKey,
    session: SessionDep,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> Page[WebhookAttemptOut]:
    """Every delivery attempt of the job's webhook, oldest first."""
    job = jobs.get_job(session, tenant_id=principal.readable_tenant, job_id=job_id)
    data, next_cursor = events.list_attempts(session, job_id=job.id, limit=limit, cursor=cursor)
    return Page(data=data, next_cursor=next_cursor)


@router.post("/jobs/{job_id}/webhook/redeliver", status_code=202, response_model=WebhookState)
def redeliver(job_id: str, principal: CurrentKey, session: SessionDep) -> WebhookState:
    """Send the job's webhook again now (same `webhook-id`), with a new round of retries.
    409 when the job has no webhook_url or has not ended."""
    job = jobs.get_job(session, tenant_id=principal.readable_tenant, job_id=job_id)
    state = events.redeliver(session, job=job)
    session.commit()
    return state
