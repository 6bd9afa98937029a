"""Engine and session factories, and the naming convention for constraints.

Services never commit: the request (FastAPI dependency) or the task boundary does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import MetaData, create_engine, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from app.config import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _engine_options(url: str, *, statement_timeout_s: float) -> dict[str, Any]:
    """What every engine of Parley's is made with; with `statement_timeout_s`, PostgreSQL
    cancels any statement of its connections that runs longer (SQLSTATE 57014, an
    OperationalError here)."""
    # Fail fast instead of hanging a request when the database is gone.
    connect_args: dict[str, Any] = {"connect_timeout": 5}
    if statement_timeout_s > 0:
        # Set when each connection starts (libpq `options`): no round trip per request.
        milliseconds = max(1, math.ceil(statement_timeout_s * 1000))
        connect_args["options"] = _options(url, f"-c statement_timeout={milliseconds}")
    return {
        # No ping before each checkout (a round trip per request): a connection the server
        # dropped fails its statement, SQLAlchemy then discards the whole pool, and the
        # request is answered 503 (app.errors) while the next one reconnects.
        "pool_pre_ping": False,
        "connect_args": connect_args,
        # Errors carry no bound values: message text and webhook secrets stay out of the logs.
        "hide_parameters": True,
    }


def make_engine(url: str, *, pool_size: int = 10, statement_timeout_s: float = 0.0) -> Engine:
    return create_engine(
        url,
        pool_size=pool_size,
        # Up to the API's threadpool (40 threads), each of which may hold one connection.
        max_overflow=30,
        **_engine_options(url, statement_timeout_s=statement_timeout_s),
    )


def make_async_pool(url: str, *, size: int) -> AsyncConnectionPool[AsyncConnection[TupleRow]]:
    """The API's pool for the hot routes that run on the event loop (the key lookup, submit):
    plain psycopg, no thread and no ORM per request (app.jobs.repository holds their SQL).
    Its connections belong to the loop that opened them, so the API's lifespan opens it and
    closes it. Bounded by this process's statement timeout, as the engine is."""
    options = _engine_options(url, statement_timeout_s=_statement_timeout_s)
    return AsyncConnectionPool(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
        # Every connection stays open (none made and closed per burst); past them a request
        # waits for one, at most 5 s (as long as a connection attempt), then is answered 503.
        min_size=size,
        max_size=size,
        timeout=5,
        # A statement alone (the key lookup) needs no BEGIN and ROLLBACK around it; a submit
        # opens its transaction (`conn.transaction()`).
        kwargs={**options["connect_args"], "autocommit": True},
        open=False,
    )


def _options(url: str, option: str) -> str:
    # `options` in connect_args replaces the URL's own (`?options=-csearch_path=...`): keep them.
    given = make_url(url).query.get("options", ())
    return " ".join([*([given] if isinstance(given, str) else given), option])


# The statement timeout of this process's engine, in seconds (0: none). Only the API sets one
# (app.main, at start): a worker's or the command line's statements (a retention sweep, an
# export to a file, a migration) may rightly run long.
_statement_timeout_s = 0.0


def set_statement_timeout(seconds: float) -> None:
    """From now on, this process's engine cancels statements running over `seconds` (0: none);
    an engine made before with another timeout is closed and made again."""
    global _statement_timeout_s
    if seconds == _statement_timeout_s:
        return
    _statement_timeout_s = seconds
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url, statement_timeout_s=_statement_timeout_s)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work for tasks and the command line: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
