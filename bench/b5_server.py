"""B5's helpers: the API in its own process, its memory, timed requests, query plans."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import Any, Self

import httpx
from sqlalchemy import Connection, event
from sqlalchemy.orm import Session

from app.admin.filters import make_filter
from app.admin.service import list_conversations


class ApiServer:
    """`parley api`'s server (uvicorn, one process) on a free port, against `database_url`."""

    def __init__(self, database_url: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_key = "pk_bench_" + secrets.token_urlsafe(16)
        self.auth = {"Authorization": f"Bearer {self.admin_key}"}
        self.env = dict(os.environ)
        self.env.update(
            DATABASE_URL=database_url,
            REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"),
            PARLEY_ADMIN_KEY=self.admin_key,
            LOG_LEVEL="WARNING",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
             "--port", str(self.port), "--log-level", "warning"],
            env=self.env,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/livez", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the API did not start")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class MemorySampler:
    """Samples a process's resident memory every 20 ms; `growth`: peak above the start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss(self.pid))

    def __enter__(self) -> Self:
        self.start = self.peak = _rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def search_once(client: httpx.Client, tenant: str, q: str) -> float:
    started = time.perf_counter()
    answer = client.get("/v1/admin/conversations", params={"tenant": tenant, "q": q})
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    return elapsed


def explain_service_query(
    conn: Connection, tenant: str | None, q: str, *, analyze: bool
) -> tuple[float, str]:
    """The admin list's own SQL for (tenant, q), as the service builds it, explained:
    (execution time in ms, or 0 without analyze; the plan)."""
    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(conn, "before_cursor_execute", capture)
    try:
        with Session(bind=conn) as session:
            list_conversations(
                session, filters=make_filter(tenant=tenant, q=q), limit=50, cursor=None
            )
    finally:
        event.remove(conn, "before_cursor_execute", capture)
    statement, parameters = next((s, p) for s, p in statements if "EXISTS" in s)
    options = "ANALYZE, BUFFERS" if analyze else "COSTS"
    plan = "\n".join(
        row[0] for row in conn.exec_driver_sql(f"EXPLAIN ({options}) {statement}", parameters)
    )
    found = re.search(r"Execution Time: ([\d.]+) ms", plan)
    return (float(found.group(1)) if found else 0.0), plan
