"""The migration history builds the schema from empty, and it matches the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

import app.models  # noqa: F401
from app.db import Base
from app.migrate import upgrade_database

pytestmark = pytest.mark.integration


def test_upgrade_from_empty_matches_models(database_url: str) -> None:
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS migration_check CASCADE"))
        connection.execute(text("CREATE SCHEMA migration_check"))
    # Build the schema from nothing in a separate schema, by the real migration history.
    separator = "&" if "?" in database_url else "?"
    url = f"{database_url}{separator}options=-csearch_path%3Dmigration_check"
    upgrade_database(url)
    check = create_engine(url)
    with check.connect() as connection:
        assert {"tenants", "api_keys", "conversations", "jobs", "messages"} <= set(
            inspect(connection).get_table_names()
        )
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == [], diff
    check.dispose()
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA migration_check CASCADE"))
    engine.dispose()
