"""Engine and session factories, and the naming convention for constraints.

Services never commit: the request (FastAPI dependency) or the task boundary does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import MetaData, create_engine
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


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    return create_engine(
        url,
        pool_size=pool_size,
        # Up to the API's threadpool (40 threads), each of which may hold one connection.
        max_overflow=30,
        # No ping before each checkout (a round trip per request): a connection the server
        # dropped fails its statement, SQLAlchemy then discards the whole pool, and the
        # request is answered 503 (app.errors) while the next one reconnects.
        pool_pre_ping=False,
        # Fail fast instead of hanging a request when the database is gone.
        connect_args={"connect_timeout": 5},
        # Errors carry no bound values: message text and webhook secrets stay out of the logs.
        hide_parameters=True,
    )


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


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
