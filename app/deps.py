"""Request dependencies: the database session, the caller's key, the admin scope."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

import redis
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.orm import Session

from app.auth.service import Principal, authenticate
from app.config import Settings, get_settings
from app.db import get_sessionmaker
from app.errors import ProblemError
from app.redis import get_redis

T = TypeVar("T")

# Requests holding a session at once: fewer than the connection pool holds (see below).
SESSION_SLOTS = 30
# /readyz and /metrics, on slots of their own (within the pool, beside SESSION_SLOTS): probes
# and scrapes neither wait behind submits nor hold them up, however many arrive.
OPS_SLOTS = 2
# Connections of the async pool (app.state.async_pool), for the routes on the event loop:
# the key lookup and submit. With the sync pool's 40 at most, 60 a process.
ASYNC_POOL_SIZE = 20
# Connections of the async Redis client (app.state.async_redis), for event stream readers.
ASYNC_REDIS_CONNECTIONS = 64


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request; the route commits, anything raised rolls back.

    A sync route runs in the threadpool, and FastAPI validates its answer in another
    threadpool call, so a request's session can hold a connection while the request waits
    for a thread. Unbounded, under load every thread could be waiting for a connection held
    by requests waiting for a thread: a deadlock until the pool's timeout. So at most
    SESSION_SLOTS requests hold a session at once (fewer than the pool's connections and the
    threadpool's threads), every other use of a connection by a request takes a slot too,
    and the session is closed here, on the event loop, needing no thread (closing is one
    short ROLLBACK round trip, which briefly blocks the loop). Requests beyond the slots
    wait here, holding nothing.
    """
    async with request.app.state.session_slots:
        session = get_sessionmaker()()
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()


@asynccontextmanager
async def pooled_connection(request: Request) -> AsyncIterator[AsyncConnection[TupleRow]]:
    """A connection of the API's async pool (app.db.make_async_pool), for the routes on the
    event loop. Requests wait their turn here for as long as it takes, holding nothing (as
    for a session slot), so the pool's own 5 s timeout is only ever reached when it cannot
    connect: the database is away, a 503."""
    async with request.app.state.async_slots:
        pool: AsyncConnectionPool[AsyncConnection[TupleRow]] = request.app.state.async_pool
        async with pool.connection() as conn:
            yield conn


async def run_in_session(request: Request, work: Callable[[Session], T]) -> T:
    """`work` given a session of its own, in the threadpool, under a session slot (as for
    get_session); the session is closed when it returns, and nothing is committed."""

    def run() -> T:
        with get_sessionmaker()() as session:
            return work(session)

    async with request.app.state.session_slots:
        return await run_in_threadpool(run)


async def _settings() -> Settings:
    # A dependency that is a plain function runs in the threadpool: a thread hop per request
    # for a cached read. Every dependency here that does not block is a coroutine.
    return get_settings()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]

_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise ProblemError(
            401,
            "A valid API key is required: Authorization: Bearer <key>.",
            headers=_UNAUTHORIZED_HEADERS,
        )
    return token


def _enforce_rate_limit(principal: Principal, settings: Settings) -> None:
    """A fixed one-minute window per key, counted in Redis."""
    limit = settings.rate_limit_per_minute
    if not limit:
        return
    now = time.time()
    counter = f"parley:rate:{principal.key_id}:{int(now // 60)}"
    try:
        pipe = get_redis().pipeline()
        pipe.incr(counter)
        pipe.expire(counter, 120)
        count = int(pipe.execute()[0])
    except redis.RedisError:
        # Fail open: an unavailable cache must not turn every request away.
        return
    if count > limit:
        raise ProblemError(
            429,
            f"This key is limited to {limit} requests a minute.",
            headers={"Retry-After": str(60 - int(now) % 60)},
        )


async def current_principal(request: Request, settings: SettingsDep) -> Principal:
    # On the event loop, on the API's async pool: no thread hop, no session slot.
    secret = _bearer(request)
    async with pooled_connection(request) as conn:
        principal = await authenticate(conn, secret=secret)
    if principal is None:
        raise ProblemError(401, "The API key is unknown or revoked.", headers=_UNAUTHORIZED_HEADERS)
    if settings.rate_limit_per_minute:
        await run_in_threadpool(_enforce_rate_limit, principal, settings)
    request.state.principal = principal
    return principal


CurrentKey = Annotated[Principal, Depends(current_principal)]


async def admin_principal(principal: CurrentKey) -> Principal:
    if not principal.is_admin:
        raise ProblemError(403, "This route needs an admin key.")
    return principal


AdminKey = Annotated[Principal, Depends(admin_principal)]
