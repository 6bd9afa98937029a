"""The statements every turn runs (app.jobs.lifecycle): its claim, its end, and the sends of
the jobs they make ready or release.

Core statements over the models' tables, built once, executed on the session's connection:
no ORM unit of work, no objects loaded, one round trip each, and the session's compiled cache
does the rest. In B2 the ORM claim and end, with their reads and flushes, were half the
worker's CPU; as these, the worker's CPU per turn fell from 10.6-11.4 ms to 6.3-8.3 ms. Each
keeps the rule lifecycle's docstrings state.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import (
    Interval,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    select,
    update,
)

from app.models import UNFINISHED, Conversation, Job, JobStatus, Message

jobs = cast(Table, Job.__table__)
conversations = cast(Table, Conversation.__table__)
messages = cast(Table, Message.__table__)
_earlier = jobs.alias("earlier")
_next = jobs.alias("next")

# The conversation's row lock, which every transition deciding what runs next takes first.
LOCK_CONVERSATION = (
    select(conversations.c.id)
    .where(conversations.c.id == bindparam("conversation"))
    .with_for_update()
)

# A job sent to the broker (its message goes once the transaction commits).
SEND = update(jobs).where(jobs.c.id == bindparam("job")).values(enqueued_at=bindparam("now"))

# The tenant's jobs sent and waiting in the broker, counted up to its share.
_sent_waiting = (
    select(func.count())
    .select_from(
        select(literal(1))
        .where(
            jobs.c.tenant_id == bindparam("tenant"),
            jobs.c.status == JobStatus.queued,
            jobs.c.enqueued_at.is_not(None),
        )
        .limit(bindparam("share"))
        .subquery()
    )
    .scalar_subquery()
)

SENT_WAITING = select(_sent_waiting)

# The tenant's held jobs its share has room for, oldest ready first, sent. A held job locked
# elsewhere is being cancelled or deleted: skipped, not waited for (its holder may be waiting
# for this tenant's lock). RETURNING has no order: the caller sorts by (ready_at, id).
RELEASE_HELD = (
    update(jobs)
    .where(
        jobs.c.id.in_(
            select(jobs.c.id)
            .where(
                jobs.c.tenant_id == bindparam("tenant"),
                jobs.c.status == JobStatus.queued,
                jobs.c.enqueued_at.is_(None),
                jobs.c.ready_at.is_not(None),
            )
            .order_by(jobs.c.ready_at, jobs.c.id)
            .limit(func.greatest(0, bindparam("share") - _sent_waiting))
            .with_for_update(skip_locked=True)
        )
    )
    .values(enqueued_at=bindparam("now"))
    .returning(jobs.c.id, jobs.c.ready_at)
)

# The conversation's first unfinished job, if queued and not yet ready, made ready.
NEXT_READY = (
    update(jobs)
    .where(
        jobs.c.id
        == select(_next.c.id)
        .where(_next.c.conversation_id == bindparam("conversation"), _next.c.status.in_(UNFINISHED))
        .order_by(_next.c.turn)
        .limit(1)
        .scalar_subquery(),
        jobs.c.status == JobStatus.queued,
        jobs.c.ready_at.is_(None),
    )
    .values(ready_at=bindparam("now"))
    .returning(jobs.c.id, jobs.c.tenant_id)
)

# The claim: queued (or running under an expired lease) and first among its conversation's
# unfinished jobs. In the same statement (PostgreSQL's UPDATE ... FROM, which locks only the
# job), what generating the turn needs: the conversation's system prompt, the turn's message
# and the last succeeded turn before it (the context its prompt must cover).
CLAIM = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("job"),
        jobs.c.cancel_requested.is_(False),
        (jobs.c.status == JobStatus.queued)
        | and_(jobs.c.status == JobStatus.running, jobs.c.lease_expires_at < func.now()),
        ~exists().where(
            _earlier.c.conversation_id == jobs.c.conversation_id,
            _earlier.c.turn < jobs.c.turn,
            _earlier.c.status.in_(UNFINISHED),
        ),
        conversations.c.id == jobs.c.conversation_id,
        messages.c.job_id == jobs.c.id,
        messages.c.role == "user",
    )
    .values(
        status=JobStatus.running,
        claim_token=bindparam("token"),
        attempts=jobs.c.attempts + 1,
        lease_expires_at=func.now() + bindparam("lease", type_=Interval),
        started_at=bindparam("now"),
    )
    .returning(
        jobs.c.attempts,
        jobs.c.tenant_id,
        jobs.c.conversation_id,
        jobs.c.turn,
        jobs.c.generation,
        jobs.c.created_at,
        jobs.c.started_at,
        conversations.c.system_prompt,
        messages.c.content,
        select(func.coalesce(func.max(_earlier.c.turn), 0))
        .where(
            _earlier.c.conversation_id == jobs.c.conversation_id,
            _earlier.c.turn < jobs.c.turn,
            _earlier.c.status == JobStatus.succeeded,
        )
        .scalar_subquery()
        .label("context_upto"),
    )
)

# A claimed job's end, if the claim still owns it. A success asked to be cancelled meanwhile
# ends cancelled.
END_CLAIMED = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("job"),
        jobs.c.status == JobStatus.running,
        jobs.c.claim_token == bindparam("token"),
    )
    .values(
        status=case(
            (
                and_(bindparam("outcome") == JobStatus.succeeded.value, jobs.c.cancel_requested),
                JobStatus.cancelled.value,
            ),
            else_=bindparam("outcome"),
        ),
        finished_at=bindparam("now"),
        lease_expires_at=None,
        error_code=bindparam("code"),
        error_message=bindparam("message"),
        # (Named unlike their columns: SQLAlchemy keeps a column's own name for itself.)
        context_messages=bindparam("context_count"),
        prompt_tokens=bindparam("prompt_count"),
        completion_tokens=bindparam("completion_count"),
        finish_reason=bindparam("reason"),
    )
    .returning(jobs.c.status, jobs.c.webhook_url)
)

# A turn's reply, and its conversation's counts. One statement: the insert rides along as a
# CTE of the conversation's update.
_reply = (
    messages.insert()
    .values(
        id=bindparam("reply_id"),
        conversation_id=bindparam("conversation"),
        job_id=bindparam("job"),
        seq=bindparam("reply_seq"),
        role="assistant",
        content=bindparam("reply"),
        created_at=bindparam("now"),
    )
    .cte("reply")
)
ADD_REPLY = (
    update(conversations)
    .where(conversations.c.id == bindparam("conversation"))
    .values(message_count=conversations.c.message_count + 1, updated_at=bindparam("now"))
    .add_cte(_reply)
)
