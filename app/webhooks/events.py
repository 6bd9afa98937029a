"""Webhook events: written with the job's end, read into the Job, redelivered on request;
and the check of a submitted webhook_url."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.errors import ProblemError
from app.ids import new_id
from app.models import Job, WebhookAttempt, WebhookEvent, WebhookStatus
from app.models.base import utcnow
from app.pagination import decode_cursor, split_page
from app.queue import enqueue_after_commit
from app.webhooks import ssrf
from app.webhooks.schemas import WebhookAttemptOut, WebhookState

DELIVER_WEBHOOK = "parley.deliver_webhook"


def record_job_end(session: Session, job: Job, *, data: dict[str, Any]) -> None:
    """Write the job end's event, its payload (`data`: the Job as the API shows it, in
    JSON) frozen now, and send it once this transaction commits. At most one per job: a
    second end of the same job (which the claim forbids anyway) finds the unique job_id
    taken and adds nothing."""
    # The delivery state belongs to the webhook being delivered, not to its content.
    data["webhook"] = None
    payload: dict[str, Any] = {
        "type": f"job.{job.status}",
        "timestamp": data["finished_at"],
        "data": data,
    }
    now = utcnow()
    event_id = new_id("evt")
    inserted = session.execute(
        insert(WebhookEvent)
        .values(
            id=event_id,
            job_id=job.id,
            tenant_id=job.tenant_id,
            url=job.webhook_url,
            type=payload["type"],
            payload=payload,
            status=WebhookStatus.pending,
            attempts=0,
            round_start=0,
            next_attempt_at=now,
            enqueued_at=now,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["job_id"])
        .returning(WebhookEvent.id)
    ).first()
    if inserted is not None:
        enqueue_after_commit(session, DELIVER_WEBHOOK, [event_id])


def _hold_redelivery(session: Session, *, event: WebhookEvent, interval: float) -> None:
    """Stamp the event's redelivery now (the database's clock), or ProblemError 429 with
    Retry-After when the last one was less than `interval` seconds ago. The caller holds
    the event's row lock, so two requests at once cannot both pass."""
    last, now = event.redelivered_at, session.execute(select(func.now())).scalar_one()
    if last is not None and interval > 0:
        assert isinstance(last, datetime) and isinstance(now, datetime)
        wait = interval - (now - last).total_seconds()
        if wait > 0:
            raise ProblemError(
                429,
                f"This job's webhook was redelivered less than {interval:g} seconds ago; "
                "retry after that.",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
    event.redelivered_at = now


def redeliver(session: Session, *, job: Job) -> WebhookState:
    """Send the job's event again now; a delivered or failed one starts a new round of
    retries. At most once per WEBHOOK_REDELIVER_INTERVAL_SECONDS per job (429 sooner)."""
    if job.webhook_url is None:
        raise ProblemError(409, "The job has no webhook_url: there is nothing to deliver.")
    event = session.execute(
        select(WebhookEvent).where(WebhookEvent.job_id == job.id).with_for_update()
    ).scalar_one_or_none()
    if event is None:
        raise ProblemError(409, "The job has not ended; its webhook is sent when it does.")
    _hold_redelivery(
        session, event=event, interval=get_settings().webhook_redeliver_interval_seconds
    )
    now = utcnow()
    if event.status != WebhookStatus.pending:
        event.status = WebhookStatus.pending
        event.round_start = event.attempts
    event.next_attempt_at = now
    event.enqueued_at = now
    enqueue_after_commit(session, DELIVER_WEBHOOK, [event.id])
    session.flush()
    return WebhookState(url=job.webhook_url, status=event.status, attempts=event.attempts)


def list_attempts(
    session: Session, *, job_id: str, limit: int, cursor: str | None
) -> tuple[list[WebhookAttemptOut], str | None]:
    """The job's delivery attempts, oldest first, keyed on the attempt number."""
    query = (
        select(WebhookAttempt)
        .join(WebhookEvent, WebhookEvent.id == WebhookAttempt.event_id)
        .where(WebhookEvent.job_id == job_id)
    )
    after = decode_cursor(cursor, (int,))
    if after is not None:
        query = query.where(WebhookAttempt.attempt > after[0])
    rows, next_cursor = split_page(
        list(session.execute(query.order_by(WebhookAttempt.attempt).limit(limit + 1)).scalars()),
        limit,
        lambda a: [a.attempt],
    )
    return [
        WebhookAttemptOut(
            attempt=a.attempt,
            at=a.at,
            status_code=a.status_code,
            error=a.error,
            duration_ms=a.duration_ms,
        )
        for a in rows
    ], next_cursor


def _refused(exc: ssrf.UnsafeWebhookUrl) -> ProblemError:
    return ProblemError(
        422,
        f"webhook_url is not allowed: {exc}.",
        errors=[{"loc": ["body", "webhook_url"], "msg": str(exc)}],
    )


# One tenant may hold at most this fraction of the process's lookups (1/TENANT_SHARE), so
# that its slow names leave the rest to the other tenants.
TENANT_SHARE = 4


class LookupSlots:
    """Host lookups in flight in this process, in all and per tenant. Full: refused at once
    (a submit never queues behind slow names)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0
        self._by_tenant: Counter[str] = Counter()

    def in_flight(self, tenant_id: str | None = None) -> int:
        with self._lock:
            return self._total if tenant_id is None else self._by_tenant[tenant_id]

    @contextmanager
    def take(self, tenant_id: str, settings: Settings) -> Iterator[None]:
        """One slot for the lookup of the block. The tenant's share taken: 429 (its own
        lookups, as its other limits are); the process's: 503 (others' load, not the
        client's doing). Either says when a slot frees: within one lookup's timeout."""
        limit = settings.webhook_resolve_concurrency
        share = max(1, limit // TENANT_SHARE)
        retry_after = {
            "Retry-After": str(max(1, math.ceil(settings.webhook_resolve_timeout_seconds)))
        }
        with self._lock:
            if self._by_tenant[tenant_id] >= share:
                raise ProblemError(
                    429,
                    f"This tenant has {share} webhook_url lookups in progress, the most "
                    "allowed at once; retry shortly.",
                    headers=retry_after,
                )
            if self._total >= limit:
                raise ProblemError(
                    503,
                    "Too many webhook_url lookups are in progress; retry shortly.",
                    headers=retry_after,
                )
            self._total += 1
            self._by_tenant[tenant_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._total -= 1
                self._by_tenant[tenant_id] -= 1
                if not self._by_tenant[tenant_id]:
                    del self._by_tenant[tenant_id]


lookup_slots = LookupSlots()


async def vet_submitted_url(url: str, settings: Settings, *, tenant_id: str) -> None:
    """At submit, with the lookup on the event loop (holding no thread): 422 on
    webhook_url when the guard refuses it, its host does not resolve or does not resolve
    within WEBHOOK_RESOLVE_TIMEOUT_SECONDS; 429 or 503 when the lookups in flight are at
    the tenant's share or the process's bound (LookupSlots). A literal address and a name of
    the hosts file take no slot: they are not looked up."""
    try:
        target = ssrf.parse_target(url)
        if target.literal is not None:
            addresses = [target.literal]
        else:
            known = ssrf.hosts_file_addresses(target.name)
            if known is not None:
                addresses = known
            else:
                with lookup_slots.take(tenant_id, settings):
                    addresses = await ssrf.resolve_dns(
                        target.name, target.port, settings.webhook_resolve_timeout_seconds
                    )
        ssrf.check_addresses(target, addresses, settings.webhook_allowed_networks)
    except ssrf.UnsafeWebhookUrl as exc:
        raise _refused(exc) from None
