"""Fair share between tenants: however many jobs one tenant has queued, another tenant's next
turn does not wait behind them all.

The broker is one FIFO queue. Each tenant has at most its *share* (FAIR_SHARE_DEFAULT, or its
own in FAIR_SHARE_TENANTS) of ready jobs sent and waiting there at once; its other ready jobs
are *held* in PostgreSQL, in the order they became ready, and one is sent each time one of its
sent jobs starts or ends unstarted (app.jobs.lifecycle). So the broker's queue interleaves the
tenants with work, each in proportion to its share, whatever their backlogs, and a tenant
alone still keeps every worker busy: running jobs do not count against the share.

Correctness rests on one per-tenant lock (a transaction-scoped advisory lock): a decision to
hold a job back and a release of held jobs never interleave, so a job is never held while its
tenant has room with no sender left to release it. Sending without the lock when the count is
under the share may go past it by the few submissions racing with it, which is harmless.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.jobs import statements
from app.models import Job, JobStatus

# pg_advisory_xact_lock(namespace, hashtext(tenant_id)): "PF" for Parley fair share. Two
# tenants whose ids hash alike only share a lock, which is correct, just more serial.
LOCK_NAMESPACE = 0x5046


def share(tenant_id: str) -> int:
    return get_settings().fair_share(tenant_id)


def _sent_waiting(session: Session, tenant_id: str, *, up_to: int) -> int:
    """The tenant's jobs sent to the broker and not yet started, counted up to `up_to`."""
    count = session.connection().execute(
        statements.SENT_WAITING, {"tenant": tenant_id, "share": up_to}
    )
    return int(count.scalar_one())


def lock_tenant(session: Session, tenant_id: str) -> None:
    session.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, func.hashtext(tenant_id))))


def has_room(session: Session, tenant_id: str) -> bool:
    """Whether a ready job of the tenant may be sent now rather than held."""
    limit = share(tenant_id)
    if _sent_waiting(session, tenant_id, up_to=limit) < limit:
        return True
    # At the share: decide under the lock, against a count that sees every start committed
    # before it, so that the release of a start racing with this cannot miss the held job.
    lock_tenant(session, tenant_id)
    return _sent_waiting(session, tenant_id, up_to=limit) < limit


def position_when_held(
    tenant_id: str, *, sent: int, own_ahead: int, unsent: Mapping[str, int]
) -> int:
    """Jobs that will run before a queued job not yet sent, under the policy: every sent job
    (`sent`), the tenant's own unsent jobs accepted before it (`own_ahead`), and from each
    other tenant (`unsent`: its unsent jobs) as many as the broker interleaves meanwhile, in
    proportion to the shares."""
    mine = share(tenant_id)
    others = sum(
        min(count, math.ceil((own_ahead + 1) * share(tenant) / mine))
        for tenant, count in unsent.items()
        if tenant != tenant_id
    )
    return sent + own_ahead + others


def held_position(session: Session, job: Job) -> int:
    """position_when_held, read exactly (the submit's own 202 reads it in app.jobs.service)."""
    sent = session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.status == JobStatus.queued, Job.enqueued_at.is_not(None))
    ).scalar_one()
    before = (Job.created_at < job.created_at) | (
        (Job.created_at == job.created_at) & (Job.id < job.id)
    )
    rows = session.execute(
        select(Job.tenant_id, func.count(), func.count().filter(before))
        .where(Job.status == JobStatus.queued, Job.enqueued_at.is_(None))
        .group_by(Job.tenant_id)
    ).all()
    own_ahead = next((int(ahead) for tenant, _, ahead in rows if tenant == job.tenant_id), 0)
    unsent = {str(tenant): int(count) for tenant, count, _ in rows}
    return position_when_held(job.tenant_id, sent=int(sent), own_ahead=own_ahead, unsent=unsent)


def sent_position(session: Session, job: Job) -> int:
    """Jobs that will run before a sent job: those sent before it (the broker is FIFO)."""
    assert job.enqueued_at is not None
    return int(
        session.execute(
            select(func.count())
            .select_from(Job)
            .where(
                Job.status == JobStatus.queued,
                Job.enqueued_at.is_not(None),
                (Job.enqueued_at < job.enqueued_at)
                | ((Job.enqueued_at == job.enqueued_at) & (Job.id < job.id)),
            )
        ).scalar_one()
    )
