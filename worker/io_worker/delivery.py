"""Delivering webhook events: claim an attempt, send it, record it, schedule the next.

The schedule is in the database (invariant 1): `next_attempt_at` says when the next attempt
is due, and the I/O worker's sweep sends due events to the queue, so retries survive the loss
of any worker or broker message. An attempt is claimed by a conditional update that takes a
lease, so two workers never make the same attempt; a worker that dies mid-attempt leaves a
lease that expires, and the event is due again. Whatever goes wrong in an attempt once it is
claimed is recorded as that attempt's failure, and the schedule moves on: an event is never
left due again and again with nothing recorded.

The sweep is fair between tenants: it takes the due attempts in rounds, each tenant's
earliest first, so one tenant's backlog cannot hold another tenant's attempts back.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, true, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.models import Tenant, WebhookAttempt, WebhookEvent, WebhookStatus
from app.models.base import utcnow
from app.queue import enqueue_after_commit
from app.webhooks import signing
from app.webhooks.events import DELIVER_WEBHOOK
from worker.io_worker import sender

log = logging.getLogger("parley.webhooks")

# Each delay of the schedule is stretched by a random part of up to this fraction, so that
# events that failed together do not all retry in the same second (never shortened: the
# schedule is the least time covered).
JITTER = 0.2
SWEEP_BATCH = 500
# The widths of the columns of an attempt's record.
MAX_ERROR_CHARS = 500
MAX_DURATION_MS = 2**31 - 1


@dataclass(frozen=True)
class AttemptClaim:
    event_id: str
    job_id: str
    attempt: int
    round_start: int
    tenant_id: str
    url: str
    payload: dict[str, Any]


def attempt_lease(settings: Settings) -> timedelta:
    """How long a claimed attempt may take before another worker presumes it lost."""
    return timedelta(
        seconds=2 * settings.webhook_timeout_seconds + settings.webhook_resolve_timeout_seconds + 5
    )


def claim_attempt(session: Session, *, event_id: str, lease: timedelta) -> AttemptClaim | None:
    """Take the event's due attempt for this worker; None when it is not due, in flight
    elsewhere, delivered, failed or gone."""
    now = utcnow()
    row = session.execute(
        update(WebhookEvent)
        .where(
            WebhookEvent.id == event_id,
            WebhookEvent.status == WebhookStatus.pending,
            WebhookEvent.next_attempt_at <= now,
            or_(WebhookEvent.lease_expires_at.is_(None), WebhookEvent.lease_expires_at < now),
        )
        .values(attempts=WebhookEvent.attempts + 1, lease_expires_at=now + lease)
        .returning(
            WebhookEvent.job_id,
            WebhookEvent.attempts,
            WebhookEvent.round_start,
            WebhookEvent.tenant_id,
            WebhookEvent.url,
            WebhookEvent.payload,
        )
    ).first()
    if row is None:
        return None
    return AttemptClaim(
        event_id,
        row.job_id,
        int(row.attempts),
        int(row.round_start),
        row.tenant_id,
        row.url,
        row.payload,
    )


def next_attempt_delay(settings: Settings, *, failures: int) -> float | None:
    """Seconds until the retry after `failures` failed attempts of a round; None: give up."""
    schedule = settings.webhook_retry_schedule
    if failures > len(schedule):
        return None
    return schedule[failures - 1] * (1 + random.uniform(0, JITTER))


def record_attempt(
    session: Session,
    claim: AttemptClaim,
    result: sender.AttemptResult,
    *,
    at: datetime,
    settings: Settings,
) -> str | None:
    """Store the attempt and the event's next state; returns that state (None: the event is
    gone, deleted with its conversation)."""
    event = session.execute(
        select(WebhookEvent).where(WebhookEvent.id == claim.event_id).with_for_update()
    ).scalar_one_or_none()
    if event is None:
        return None
    session.add(
        WebhookAttempt(
            event_id=claim.event_id,
            attempt=claim.attempt,
            at=at,
            status_code=result.status_code,
            # Bounded here, whatever produced them: a record that does not fit its column
            # would fail, and the attempt would be made again and again with none recorded.
            error=None if result.error is None else result.error[:MAX_ERROR_CHARS],
            duration_ms=min(max(result.duration_ms, 0), MAX_DURATION_MS),
        )
    )
    # Only the latest claim moves the event on: an attempt that outlived its lease (another
    # worker has claimed the next one since) is recorded and no more.
    if event.attempts != claim.attempt or event.status != WebhookStatus.pending:
        return str(event.status)
    delay = (
        None
        if result.delivered
        else next_attempt_delay(settings, failures=claim.attempt - claim.round_start)
    )
    if result.delivered or delay is None:
        event.status = WebhookStatus.delivered if result.delivered else WebhookStatus.failed
        event.next_attempt_at = None
    else:
        event.next_attempt_at = utcnow() + timedelta(seconds=delay)
    event.lease_expires_at = None
    event.enqueued_at = None
    session.flush()
    return str(event.status)


def _body(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _attempt(claim: AttemptClaim, settings: Settings, *, at: datetime) -> sender.AttemptResult:
    with session_scope() as session:
        keys = signing.signing_secrets(
            signing.tenant_secret(session, tenant_id=claim.tenant_id), now=at
        )
    body = _body(claim.payload)
    headers = signing.sign_headers(message_id=claim.event_id, body=body, keys=keys, at=at)
    return sender.post(
        claim.url,
        body.encode("utf-8"),
        headers,
        allowed=settings.webhook_allowed_networks,
        timeout=settings.webhook_timeout_seconds,
        resolve_timeout=settings.webhook_resolve_timeout_seconds,
    )


def deliver(event_id: str, settings: Settings) -> str | None:
    """Make the event's due attempt, if it is still due and nobody else is making it."""
    with session_scope() as session:
        claim = claim_attempt(session, event_id=event_id, lease=attempt_lease(settings))
    if claim is None:
        return None
    at = utcnow()
    started = time.monotonic()
    try:
        result = _attempt(claim, settings, at=at)
    except Exception as exc:
        # The claim is committed: unrecorded, this attempt would be claimed again when its
        # lease expires, and again, the count growing with nothing to show for it.
        log.exception("webhook %s, attempt %d: failed in Parley", event_id, claim.attempt)
        result = sender.AttemptResult(
            None,
            f"internal error, attempt abandoned: {sender.describe(exc)}",
            int((time.monotonic() - started) * 1000),
        )
    with session_scope() as session:
        state = record_attempt(session, claim, result, at=at, settings=settings)
    log.info(
        "webhook %s of job %s, attempt %d: %s in %d ms -> %s",
        event_id,
        claim.job_id,
        claim.attempt,
        result.status_code if result.error is None else result.error,
        result.duration_ms,
        state,
    )
    return state


def _due(now: datetime, resend_before: datetime) -> ColumnElement[bool]:
    """Pending, due, in flight nowhere and with no recent message in the broker."""
    return and_(
        WebhookEvent.status == WebhookStatus.pending,
        WebhookEvent.next_attempt_at <= now,
        or_(WebhookEvent.lease_expires_at.is_(None), WebhookEvent.lease_expires_at < now),
        or_(WebhookEvent.enqueued_at.is_(None), WebhookEvent.enqueued_at < resend_before),
    )


def sweep_due(settings: Settings, *, batch: int = SWEEP_BATCH) -> int:
    """Send up to `batch` due events whose message no worker is holding to the queue, fairly
    between tenants; returns how many.

    Round-robin: every tenant's earliest due attempt, then every tenant's second, and so on
    (the earliest first within a round), so a tenant with one due attempt is sent in this
    sweep whatever another tenant has due. Each tenant's candidates are read from its end of
    ix_webhook_events_due_tenant, at most `batch` of them, without a scan of all due rows."""
    now = utcnow()
    resend_before = now - timedelta(seconds=settings.webhook_redispatch_seconds)
    due = _due(now, resend_before)
    per_tenant = (
        select(WebhookEvent.id, WebhookEvent.next_attempt_at)
        .where(WebhookEvent.tenant_id == Tenant.id, due)
        .order_by(WebhookEvent.next_attempt_at)
        .limit(batch)
        .lateral("due")
    )
    turn = (
        func.row_number()
        .over(partition_by=Tenant.id, order_by=per_tenant.c.next_attempt_at)
        .label("turn")
    )
    candidates = (
        select(per_tenant.c.id, per_tenant.c.next_attempt_at, turn)
        .join_from(Tenant, per_tenant, onclause=true())
        .subquery("candidates")
    )
    chosen = (
        select(candidates.c.id)
        .order_by(candidates.c.turn, candidates.c.next_attempt_at)
        .limit(batch)
    )
    with session_scope() as session:
        ids = list(session.execute(chosen).scalars())
        if not ids:
            return 0
        # Locked and checked again: a worker may have claimed one since it was read.
        locked = list(
            session.execute(
                select(WebhookEvent.id)
                .where(WebhookEvent.id.in_(ids), due)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        if locked:
            session.execute(
                update(WebhookEvent).where(WebhookEvent.id.in_(locked)).values(enqueued_at=now)
            )
        for event_id in locked:
            enqueue_after_commit(session, DELIVER_WEBHOOK, [event_id])
    return len(locked)
