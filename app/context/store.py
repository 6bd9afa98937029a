"""The recent context of a conversation: cached in Redis, rebuilt from PostgreSQL.

The prompt must be the same with or without the cache, so a cached copy is used only when
it covers exactly the succeeded turns the database says came before the one being run.
"""

from __future__ import annotations

import contextlib

import redis
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Job, JobStatus, Message
from app.schemas import ChatMessage


class Context(BaseModel):
    """Stored in Redis as this model's JSON."""

    model_config = ConfigDict(frozen=True)

    # The last succeeded turn the messages cover (0: none).
    upto_turn: int
    messages: list[ChatMessage]


def _key(conversation_id: str) -> str:
    return f"parley:context:{conversation_id}"


def last_succeeded_turn(session: Session, *, conversation_id: str, before_turn: int) -> int:
    turn = session.execute(
        select(func.max(Job.turn)).where(
            Job.conversation_id == conversation_id,
            Job.turn < before_turn,
            Job.status == JobStatus.succeeded,
        )
    ).scalar_one()
    return int(turn or 0)


def load_from_database(
    session: Session, *, conversation_id: str, before_turn: int, max_messages: int
) -> Context:
    """User messages and replies of succeeded turns before `before_turn`, oldest first."""
    rows = list(
        session.execute(
            select(Message.role, Message.content, Job.turn)
            .join(Job, Job.id == Message.job_id)
            .where(
                Message.conversation_id == conversation_id,
                Job.turn < before_turn,
                Job.status == JobStatus.succeeded,
            )
            .order_by(Message.seq.desc())
            .limit(max_messages)
        ).all()
    )
    rows.reverse()
    upto = rows[-1].turn if rows else 0
    return Context(
        upto_turn=upto, messages=[ChatMessage(role=r.role, content=r.content) for r in rows]
    )


class ContextStore:
    def __init__(self, client: redis.Redis, *, ttl_seconds: int, max_messages: int) -> None:
        self._redis = client
        self._ttl = ttl_seconds
        # Succeeded turns add a user message and its reply: an even count keeps them paired.
        self.max_messages = max_messages - max_messages % 2

    def get(self, conversation_id: str) -> Context | None:
        raw = self._redis.get(_key(conversation_id))
        if raw is None:
            return None
        return Context.model_validate_json(raw)

    def put(self, conversation_id: str, context: Context) -> None:
        kept = context.model_copy(update={"messages": context.messages[-self.max_messages :]})
        self._redis.set(_key(conversation_id), kept.model_dump_json(), ex=self._ttl)

    def delete(self, conversation_id: str) -> None:
        self._redis.delete(_key(conversation_id))

    def load(self, session: Session, *, conversation_id: str, before_turn: int) -> Context:
        """The context for running turn `before_turn`: the cache when it is current, else the
        database (and the cache is refreshed)."""
        expected = last_succeeded_turn(
            session, conversation_id=conversation_id, before_turn=before_turn
        )
        try:
            cached = self.get(conversation_id)
        except redis.RedisError:
            cached = None
        if cached is not None and cached.upto_turn == expected:
            return cached
        context = load_from_database(
            session,
            conversation_id=conversation_id,
            before_turn=before_turn,
            max_messages=self.max_messages,
        )
        self._put_quietly(conversation_id, context)
        return context

    def extend(
        self, conversation_id: str, context: Context, *, turn: int, added: list[ChatMessage]
    ) -> None:
        """After turn `turn` succeeded on top of `context`: cache the context that follows it."""
        following = Context(upto_turn=turn, messages=[*context.messages, *added])
        self._put_quietly(conversation_id, following)

    def _put_quietly(self, conversation_id: str, context: Context) -> None:
        # The cache is an optimisation: a Redis outage must not fail a turn.
        with contextlib.suppress(redis.RedisError):
            self.put(conversation_id, context)
