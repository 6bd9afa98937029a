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

_jobs = cast(Table, Job.__table__)
_conversations = cast(Table, Conversation.__table__)
_messages = cast(Table, Message.__table__)
_earlier = _jobs.alias("earlier")
_next = _jobs.alias("next")

# The conversation's row lock, which every transition deciding what runs next takes first.
LOCK_CONVERSATION = (
    select(_conversations.c.id)
    .where(_conversations.c.id == bindparam("conversation"))
    .with_for_update()
)

# A job sent to the broker (its message goes once the transaction commits).
SEND = update(_jobs).where(_jobs.c.id == bindparam("job")).values(enqueued_at=bindparam("now"))

# The tenant's jobs sent and waiting in the broker, counted up to its share.
_sent_waiting = (
    select(func.count())
    .select_from(
        select(literal(1))
        .where(
            _jobs.c.tenant_id == bindparam("tenant"),
            _jobs.c.status == JobStatus.queued,
            _jobs.c.enqueued_at.is_not(None),
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
    update(_jobs)
    .where(
        _jobs.c.id.in_(
            select(_jobs.c.id)
            .where(
                _jobs.c.tenant_id == bindparam("tenant"),
                _jobs.c.status == JobStatus.queued,
                _jobs.c.enqueued_at.is_(None),
                _jobs.c.ready_at.is_not(None),
            )
            .order_by(_jobs.c.ready_at, _jobs.c.id)
            .limit(func.greatest(0, bindparam("share") - _sent_waiting))
            .with_for_update(skip_locked=True)
        )
    )
    .values(enqueued_at=bindparam("now"))
    .returning(_jobs.c.id, _jobs.c.ready_at)
)

# The conversation's first unfinished job, if queued and not yet ready, made ready.
NEXT_READY = (
    update(_jobs)
    .where(
        _jobs.c.id
        == select(_next.c.id)
        .where(_next.c.conversation_id == bindparam("conversation"), _next.c.status.in_(UNFINISHED))
        .order_by(_next.c.turn)
        .limit(1)
        .scalar_subquery(),
        _jobs.c.status == JobStatus.queued,
        _jobs.c.ready_at.is_(None),
    )
    .values(ready_at=bindparam("now"))
    .returning(_jobs.c.id, _jobs.c.tenant_id)
)

# The claim: queued (or running under an expired lease) and first among its conversation's
# unfinished jobs. In the same statement (PostgreSQL's UPDATE ... FROM, which locks only the
# job), what generating the turn needs: the conversation's system prompt, the turn's message
# and the last succeeded turn before it (the context its prompt must cover).
CLAIM = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("job"),
        _jobs.c.cancel_requested.is_(False),
        (_jobs.c.status == JobStatus.queued)
        | and_(_jobs.c.status == JobStatus.running, _jobs.c.lease_expires_at < func.now()),
        ~exists().where(
            _earlier.c.conversation_id == _jobs.c.conversation_id,
            _earlier.c.turn < _jobs.c.turn,
            _earlier.c.status.in_(UNFINISHED),
        ),
        _conversations.c.id == _jobs.c.conversation_id,
        _messages.c.job_id == _jobs.c.id,
        _messages.c.role == "user",
    )
    .values(
        status=JobStatus.running,
        claim_token=bindparam("token"),
        attempts=_jobs.c.attempts + 1,
        lease_expires_at=func.now() + bindparam("lease", type_=Interval),
        started_at=bindparam("now"),
    )
    .returning(
        _jobs.c.attempts,
        _jobs.c.tenant_id,
        _jobs.c.conversation_id,
        _jobs.c.turn,
        _jobs.c.generation,
        _jobs.c.created_at,
        _jobs.c.started_at,
        _conversations.c.system_prompt,
        _messages.c.content,
        select(func.coalesce(func.max(_earlier.c.turn), 0))
        .where(
            _earlier.c.conversation_id == _jobs.c.conversation_id,
            _earlier.c.turn < _jobs.c.turn,
            _earlier.c.status == JobStatus.succeeded,
        )
        .scalar_subquery()
        .label("context_upto"),
    )
)

# A claimed job's end, if the claim still owns it. A success asked to be cancelled meanwhile
# ends cancelled.
END_CLAIMED = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("job"),
        _jobs.c.status == JobStatus.running,
        _jobs.c.claim_token == bindparam("token"),
    )
    .values(
        status=case(
            (
                and_(bindparam("outcome") == JobStatus.succeeded.value, _jobs.c.cancel_requested),
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
    .returning(_jobs.c.status, _jobs.c.webhook_url)
)

# A turn's reply, and its conversation's counts. One statement: the insert rides along as a
# CTE of the conversation's update.
_reply = (
    _messages.insert()
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
    update(_conversations)
    .where(_conversations.c.id == bindparam("conversation"))
    .values(message_count=_conversations.c.message_count + 1, updated_at=bindparam("now"))
    .add_cte(_reply)
)
