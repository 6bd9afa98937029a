"""The database schema: bring it to the newest Alembic migration (`parley migrate`, `parley
dev`, the tests and the benchmarks all call this)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]


def upgrade_database(database_url: str | None = None, *, revision: str = "head") -> None:
    """Apply the migrations not yet applied, up to `revision` (safe to run again);
    `database_url` defaults to the settings' DATABASE_URL (read by migrations/env.py)."""
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(config, revision)
