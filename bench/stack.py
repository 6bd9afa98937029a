"""The whole service for a benchmark: a fresh database, the API and the turn workers, each in
its own process started as `parley api` and `parley worker` start them.

PostgreSQL: the server of BENCH_DATABASE_URL (default: the one at 127.0.0.1:5432), in a
database of the benchmark's own, dropped and made again. Redis: BENCH_REDIS_URL (default
database 12 of the local server; the broker takes the next one), flushed first. Workers use
the GPU when there is one (`--gpus auto`).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import psycopg
import redis
from psycopg import sql

from app.config import next_redis_database, normalize_database_url

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".parley" / "bench" / "models"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"


def say(text: str) -> None:
    print(text, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def model_dir(size: str) -> Path:
    """The local model of `size`, built once (fixed seed) and reused."""
    directory = MODELS / size
    if not (directory / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "worker.inference.model_init", str(directory), "--size", size],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return directory


def _fresh_database(name: str) -> str:
    server = os.environ.get("BENCH_DATABASE_URL", DEFAULT_SERVER)
    base, _, _ = server.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return normalize_database_url(f"{base}/{name}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Stack:
    """`with Stack("b2", model="tiny") as stack:` the service is up at `stack.base_url`."""

    def __init__(self, name: str, *, model: str, workers: bool = True, **settings: str) -> None:
        self.name = name
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_key = "pk_bench_" + secrets.token_urlsafe(16)
        self.model = model_dir(model)
        self.with_workers = workers
        self.env = dict(os.environ)
        self.env.update(
            REDIS_URL=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS),
            MODEL_ID=str(self.model),
            PARLEY_ADMIN_KEY=self.admin_key,
            LOG_LEVEL="WARNING",
            **settings,
        )
        self.env.pop("BROKER_URL", None)
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        from app.migrate import upgrade_database

        self.env["DATABASE_URL"] = _fresh_database(f"bench_{self.name}")
        for url in (self.env["REDIS_URL"], next_redis_database(self.env["REDIS_URL"])):
            redis.Redis.from_url(url).flushdb()
        upgrade_database(self.env["DATABASE_URL"])
        api = [sys.executable, "-m", "app.cli", "api", "--port", str(self.port)]
        self.procs.append(subprocess.Popen(api, env=self.env))
        if self.with_workers:
            worker = [sys.executable, "-m", "worker.gpus", "--gpus", "auto"]
            self.procs.append(subprocess.Popen(worker, env=self.env))
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 180) -> None:
        path = "/readyz" if self.with_workers else "/livez"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a process of the stack exited while starting")
            try:
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the stack was not ready within {timeout}s")

    def worker_metric(self, name: str) -> float:
        """The sum over workers of a metric sample on the API's /metrics (0 when absent)."""
        text = httpx.get(self.base_url + "/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and 'worker="' in line
        )

    def create_key(self, tenant: str) -> str:
        answer = httpx.post(
            self.base_url + "/v1/admin/keys",
            json={"tenant": tenant, "scope": "client"},
            headers={"Authorization": f"Bearer {self.admin_key}"},
        )
        answer.raise_for_status()
        return str(answer.json()["key"])

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
