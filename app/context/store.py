"""The recent context of a conversation: cached in Redis, rebuilt from PostgreSQL.

The prompt must be the same with or without the cache, so a cached copy is used only when
it covers exactly the succeeded turns the database says came before the one being run.
"""

from __future__ import annotations

import contextlib

import redis
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, JobStatus, Message
from app.schemas import ChatMessage


class Context(BaseModel):
    """Stored in Redis as this model's JSON."""

    model_config = ConfigDict(frozen=True)

    # The last succeeded turn the messages cover (0: none).
    upto_turn: int
    messages: list[ChatMessage]


def _messages_key(conversation_id: str) -> str:
    return f"parley:context:{conversation_id}"


def _state_key(conversation_id: str) -> str:
    return f"parley:context:{conversation_id}:upto"


def _state(upto_turn: int, count: int) -> str:
    # The turn the messages cover and how many they are: a cache that evicts may drop one of
    # the two keys, and a list of another length than its state says is not used.
    return f"{upto_turn}:{count}"


# After a turn: append its two messages, but only onto the copy it was built on (whole, and
# covering the turn expected); else nothing, and the caller writes the whole context.
_APPEND = """
local state = redis.call('GET', KEYS[2])
if not state then return 0 end
local sep = string.find(state, ':', 1, true)
if string.sub(state, 1, sep - 1) ~= ARGV[1] then return 0 end
if redis.call('LLEN', KEYS[1]) ~= tonumber(string.sub(state, sep + 1)) then return 0 end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 5))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
local count = redis.call('LLEN', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2] .. ':' .. count, 'EX', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


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
        self._append = client.register_script(_APPEND)

    def get(self, conversation_id: str) -> Context | None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(_state_key(conversation_id))
        pipe.lrange(_messages_key(conversation_id), 0, -1)
        state, messages = pipe.execute()
        if state is None:
            return None
        upto, _, count = (state.decode() if isinstance(state, bytes) else state).partition(":")
        if int(count) != len(messages):
            return None  # half evicted
        return Context(
            upto_turn=int(upto), messages=[ChatMessage.model_validate_json(m) for m in messages]
        )

    def put(self, conversation_id: str, context: Context) -> None:
        """Write the whole context (after a rebuild from the database)."""
        messages = [m.model_dump_json() for m in context.messages[-self.max_messages :]]
        key = _messages_key(conversation_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        if messages:
            pipe.rpush(key, *messages)
            pipe.expire(key, self._ttl)
        pipe.set(
            _state_key(conversation_id), _state(context.upto_turn, len(messages)), ex=self._ttl
        )
        pipe.execute()

    def delete(self, conversation_id: str) -> None:
        self._redis.delete(_messages_key(conversation_id), _state_key(conversation_id))

    def load(
        self, session: Session, *, conversation_id: str, before_turn: int, upto_turn: int
    ) -> Context:
        """The context for running turn `before_turn`, whose last succeeded turn before it is
        `upto_turn` as the database says (the claim reads it): the cache when it covers
        exactly that, else the database (and the cache is refreshed)."""
        try:
            cached = self.get(conversation_id)
        except redis.RedisError:
            cached = None
        if cached is not None and cached.upto_turn == upto_turn:
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
        """After turn `turn` succeeded on top of `context`: cache the context that follows it,
        appending the turn's messages to the cached copy (a few hundred bytes, whatever the
        conversation's length) when that copy is the one the turn was built on."""
        with contextlib.suppress(redis.RedisError):
            appended = self._append(
                keys=[_messages_key(conversation_id), _state_key(conversation_id)],
                args=[context.upto_turn, turn, self.max_messages, self._ttl]
                + [m.model_dump_json() for m in added],
            )
            if not appended:
                following = Context(upto_turn=turn, messages=[*context.messages, *added])
                self.put(conversation_id, following)

    def _put_quietly(self, conversation_id: str, context: Context) -> None:
        # The cache is an optimisation: a Redis outage must not fail a turn.
        with contextlib.suppress(redis.RedisError):
            self.put(conversation_id, context)
