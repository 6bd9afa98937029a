"""Alembic environment: Parley's models and settings, online migrations only."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

import app.models  # noqa: F401  (registers every table on Base.metadata)
from app.config import get_settings, normalize_database_url
from app.db import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    # A URL set by the caller (tests, `parley migrate`) wins over the environment.
    url = context.config.get_main_option("sqlalchemy.url") or get_settings().database_url
    engine = create_engine(normalize_database_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
