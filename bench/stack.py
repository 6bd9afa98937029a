"""The whole service for a benchmark, on app.dev.stack (the harness `parley dev` and the tests
use too): a fresh database, clean Redis databases, the API and the turn workers, each in its
own process started as `parley api` and `parley worker` start them.

PostgreSQL: the server of BENCH_DATABASE_URL (default: the one at 127.0.0.1:5432), in a
database of the benchmark's own, dropped and made again (or an existing one, `database_url`).
Redis: BENCH_REDIS_URL (default database 12 of the local server; the broker takes the next
one), flushed first. Workers use the GPU when there is one (`--gpus auto`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import redis

from app.config import next_redis_database
from app.dev.postgres import create_database
from app.dev.stack import ROOT, Process, Stack, ensure_model, free_port
from app.migrate import upgrade_database
from worker.inference.model_init import build_model

MODELS = ROOT / ".parley" / "bench" / "models"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"


def model_dir(size: str) -> Path:
    """The benchmarks' local model of `size`, built once (fixed seed) and reused."""
    return ensure_model(MODELS / size, size=size)


def bench_database(name: str, *, fresh: bool) -> str:
    """The URL of the benchmark's database `name` on BENCH_DATABASE_URL's server."""
    server = os.environ.get("BENCH_DATABASE_URL", DEFAULT_SERVER)
    return create_database(server, name, drop_existing=fresh)


def long_model_dir(context_tokens: int = 4096) -> Path:
    """The small model with a chat model's context window (GPT-2's is 1,024), built once."""
    directory = MODELS / f"small-{context_tokens}"
    if not (directory / "config.json").exists():
        build_model(directory, size="small", context_tokens=context_tokens)
    return directory.resolve()


class BenchStack:
    """`with BenchStack("b2", model="tiny") as stack:` the service is up at `stack.base_url`,
    with `stack.admin_key`. `database_url`: serve that database as it is (no migration)."""

    def __init__(
        self,
        name: str,
        *,
        model: str | Path | None,
        workers: bool = True,
        database_url: str | None = None,
        **settings: str,
    ) -> None:
        self.name = name
        self.admin_key = "pk_bench_" + secrets.token_urlsafe(16)
        self.with_workers = workers
        self.database_url = database_url
        self.env = {
            "REDIS_URL": os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS),
            "PARLEY_ADMIN_KEY": self.admin_key,
            "LOG_LEVEL": "WARNING",
            **settings,
        }
        # A size name (the benchmarks' shared models) or a model's folder.
        self.model = model_dir(model) if isinstance(model, str) else model
        if self.model is not None:
            self.env["MODEL_ID"] = str(self.model)
        self.port = free_port()
        self.stack = Stack(self.env)
        # The broker follows REDIS_URL (the next database), never a BROKER_URL of the shell.
        self.stack.env.pop("BROKER_URL", None)
        self.api: Process | None = None
        self.worker: Process | None = None

    @property
    def base_url(self) -> str:
        assert self.stack.base_url is not None
        return self.stack.base_url

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    @property
    def api_pid(self) -> int:
        assert self.api is not None
        return self.api.pid

    @property
    def worker_pid(self) -> int | None:
        """The turn worker's supervisor (`parley worker`; the worker is its child)."""
        return None if self.worker is None else self.worker.pid

    def __enter__(self) -> Self:
        if self.database_url is None:
            self.database_url = bench_database(f"bench_{self.name}", fresh=True)
            upgrade_database(self.database_url)
        self.stack.env["DATABASE_URL"] = self.database_url
        for url in (self.env["REDIS_URL"], next_redis_database(self.env["REDIS_URL"])):
            redis.Redis.from_url(url).flushdb()
        self.api = self.stack.api(port=self.port)
        if self.with_workers:
            self.worker = self.stack.turn_worker(gpus="auto")
        if not self.stack.wait_ready("/readyz" if self.with_workers else "/livez"):
            self.stack.stop()
            raise RuntimeError("the stack did not become ready (a process exited or 180 s)")
        return self

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
            headers=self.admin_headers,
        )
        answer.raise_for_status()
        return str(answer.json()["key"])

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stack.stop()
