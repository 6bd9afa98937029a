"""One fault scenario's world: its own PostgreSQL and Redis (which the test may stop, kill and
start again), Parley's real processes over them (app.dev.stack), an HTTP client, and direct
reads of the outcome from the database.

Nothing here touches the servers the rest of the suite uses (tests/conftest.py's): every URL
a process gets is passed in its environment, and the test process never reads Parley's
settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import psutil
import psycopg
import redis

from app.dev.postgres import LocalPostgres, libpq_url
from app.dev.redis_server import LocalRedis
from app.dev.stack import ROOT, Stack, ensure_model, free_port
from app.migrate import upgrade_database
from app.redis import WORKERS_KEY

BROKER_MARKER = "parley:broker-marker"  # worker/turn_worker/reconciler.py
TERMINAL = ("succeeded", "failed", "cancelled")
ADMIN_KEY = "pk_faults_admin_0123456789abcdef"

# Small settings: a dead worker's turns are re-queued within seconds, not minutes.
FAST = {
    "WORKER_HEARTBEAT_SECONDS": "1",
    "TURN_LEASE_SECONDS": "3",
    "RECONCILE_INTERVAL_SECONDS": "1",
}


@dataclass
class Outcome:
    """The jobs' states as the database holds them."""

    jobs: int
    terminal: int
    succeeded: int
    failed: int
    duplicate_replies: int
    duplicate_events: int
    max_attempts: int
    statuses: dict[str, int]
    errors: dict[str, int]


class FaultWorld:
    """PostgreSQL, Redis and Parley's processes for one test, under `directory`."""

    def __init__(self, directory: Path, **settings: str) -> None:
        self.directory = directory
        self.log = directory / "parley.log"
        # Not under pytest's basetemp: each pytest session that starts (another engineer's
        # included) makes /tmp/pytest-of-<user> 0700 again, and PostgreSQL runs as its own
        # system user, which must traverse the path to its data directory.
        self.pg_dir = Path(tempfile.mkdtemp(prefix="parley-faults-pg-"))
        self.pg = LocalPostgres(self.pg_dir)
        # A fixed port: a Redis started again answers at the same URL.
        self.redis = LocalRedis(directory / "redis", port=free_port())
        self.settings = settings
        self.database_url = ""
        self.stack: Stack | None = None
        self.base_url = ""
        self._http: httpx.Client | None = None

    # Servers -------------------------------------------------------------------------------

    def start(self) -> None:
        self.pg.start()
        self.database_url = self.pg.create_database("parley")
        upgrade_database(self.database_url)
        self.redis.start()
        port = self.redis.port
        model = ensure_model(ROOT / ".parley" / "test" / "models" / "tiny")
        env = {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "BROKER_URL": f"redis://127.0.0.1:{port}/1",
            "MODEL_ID": str(model),
            "PARLEY_ADMIN_KEY": ADMIN_KEY,
            "LOG_LEVEL": "INFO",
            # Every line reaches the log before a kill.
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            **FAST,
            **self.settings,
        }
        self.stack = Stack(env)

    def close(self) -> None:
        try:
            if self._http is not None:
                self._http.close()
            if self.stack is not None:
                self.stack.stop(timeout=10)
        finally:
            try:
                self.redis.stop()
            finally:
                try:
                    self.pg.stop()
                finally:
                    shutil.rmtree(self.pg_dir, ignore_errors=True)

    def restart_redis_empty(self) -> None:
        """Stop Redis and start it again on the same port; it keeps nothing (no RDB, no AOF)."""
        self.redis.stop()
        for leftover in ("dump.rdb", "appendonly.aof"):
            (self.redis.data_dir / leftover).unlink(missing_ok=True)
        self.redis.start()

    # Processes -----------------------------------------------------------------------------

    def api(self) -> None:
        assert self.stack is not None
        self.stack.api(log=self.log)
        assert self.stack.base_url is not None
        self.base_url = self.stack.base_url
        assert self.stack.wait_ready("/livez", timeout=60), self.problems()
        self._http = httpx.Client(base_url=self.base_url, timeout=30)

    def worker(
        self, name: str, *, supervised: bool = False, **settings: str
    ) -> subprocess.Popen[bytes]:
        """`parley worker --gpus cpu --no-restart --name name`: the Celery worker itself; or,
        `supervised`, under the supervisor that restarts it when it exits (production's)."""
        assert self.stack is not None
        return self.stack.turn_worker(
            gpus="cpu", name=name, supervised=supervised, log=self.log, **settings
        )

    def wait_worker(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        """Until the worker's heartbeat reports it (its model is loaded, it takes tasks)."""
        deadline = time.monotonic() + timeout
        client = self.redis_client()
        while True:
            assert proc.poll() is None, f"worker {name} exited\n{self.problems()}"
            with contextlib.suppress(redis.RedisError):
                members = client.zrange(WORKERS_KEY, 0, -1)
                if any(str(member).startswith(f"{name}@") for member in members):
                    return
            assert time.monotonic() < deadline, f"worker {name} did not report\n{self.problems()}"
            time.sleep(0.2)

    def wait_broker_marker(self, timeout: float = 10) -> None:
        """Until a reconciler has run once on this broker (it sets the marker key)."""
        deadline = time.monotonic() + timeout
        while not self.redis_client(1).exists(BROKER_MARKER):
            assert time.monotonic() < deadline, "no reconciler ran"
            time.sleep(0.1)

    def held_messages(self) -> set[str]:
        """The job ids of the turn messages delivered to a worker and not yet acknowledged (the
        Redis transport keeps them in its `unacked` hash until then)."""
        return _job_ids(self.redis_client(1).hvals("unacked"))

    def queued_messages(self) -> set[str]:
        """The job ids of the turn messages waiting in the broker's queue."""
        return _job_ids(self.redis_client(1).lrange("parley.turns", 0, -1))

    def kill(self, proc: subprocess.Popen[bytes]) -> float:
        """SIGKILL, like the OOM killer or a lost machine: no shutdown code runs. Its own
        children (a worker's engine process) must end too, within 10 s, not linger holding a
        model: returns the seconds they took."""
        children = psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        assert self.stack is not None
        self.stack.procs.remove(proc)
        deadline = killed_at + 10
        while (alive := [c for c in children if _running(c)]) and time.monotonic() < deadline:
            time.sleep(0.01)
        for child in alive:
            child.kill()
        assert not alive, f"children of the killed process outlived it: {alive}"
        return time.monotonic() - killed_at

    # Clients -------------------------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        assert self._http is not None, "call api() first"
        return self._http

    def redis_client(self, db: int = 0) -> redis.Redis:
        assert self.redis.port is not None
        return redis.Redis(
            host="127.0.0.1", port=self.redis.port, db=db, decode_responses=True, socket_timeout=2
        )

    def create_key(self, tenant: str) -> str:
        answer = self.http.post(
            "/v1/admin/keys",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            json={"tenant": tenant, "scope": "client"},
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["key"])

    def submit(self, key: str, message: str, **body: Any) -> dict[str, Any]:
        answer = self.http.post(
            "/v1/jobs",
            headers={"Authorization": f"Bearer {key}"},
            json={"message": message, **body},
        )
        assert answer.status_code == 202, answer.text
        return dict(answer.json())

    def streamed_reply(self, key: str, job_id: str) -> str:
        """The reply as the job's event stream tells it: its deltas, joined."""
        pieces = []
        with httpx_sse.connect_sse(
            self.http,
            "GET",
            f"/v1/jobs/{job_id}/events",
            headers={"Authorization": f"Bearer {key}"},
        ) as source:
            for event in source.iter_sse():
                if event.event == "delta":
                    pieces.append(json.loads(event.data)["text"])
        return "".join(pieces)

    def new_conversations(
        self, key: str, count: int, *, max_new_tokens: int, **body: Any
    ) -> tuple[list[str], list[str]]:
        """The first turns of `count` new conversations: (job ids, conversation ids)."""
        generation = {"max_new_tokens": max_new_tokens}
        jobs = [
            self.submit(key, f"Conversation {c}, turn 1: hello.", generation=generation, **body)
            for c in range(count)
        ]
        return [j["id"] for j in jobs], [j["conversation_id"] for j in jobs]

    def more_turns(
        self, key: str, conversations: list[str], turns: int, *, max_new_tokens: int, **body: Any
    ) -> list[str]:
        """`turns` more turns in each conversation, submitted round-robin: their job ids."""
        generation = {"max_new_tokens": max_new_tokens}
        return [
            self.submit(
                key,
                f"Conversation {c}, next turn {t}: go on.",
                conversation_id=conversation,
                generation=generation,
                **body,
            )["id"]
            for t in range(turns)
            for c, conversation in enumerate(conversations)
        ]

    def status_counts(self) -> dict[str, int]:
        with self.db() as conn:
            rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
        return {str(status): int(n) for status, n in rows}

    def wait_running(self, at_least: int, *, timeout: float) -> int:
        """Once at least `at_least` turns run at once (generating, for a fault to hit them):
        how many do."""
        deadline = time.monotonic() + timeout
        while (running := self.status_counts().get("running", 0)) < at_least:
            assert time.monotonic() < deadline, f"not {at_least} running: {self.status_counts()}"
            time.sleep(0.02)
        return running

    # The database --------------------------------------------------------------------------

    @contextlib.contextmanager
    def db(self) -> Iterator[psycopg.Connection[Any]]:
        with psycopg.connect(
            libpq_url(self.database_url), autocommit=True, connect_timeout=3
        ) as conn:
            yield conn

    def outcome(self, job_ids: list[str] | None = None) -> Outcome:
        """The jobs' states (all jobs, or `job_ids`), with duplicate replies and events."""
        where, args = ("WHERE j.id = ANY(%s)", [job_ids]) if job_ids is not None else ("", [])
        with self.db() as conn:
            rows = conn.execute(
                f"""
                SELECT j.status, j.error_code, j.attempts,
                       (SELECT count(*) FROM messages m
                         WHERE m.job_id = j.id AND m.role = 'assistant'),
                       (SELECT count(*) FROM webhook_events e WHERE e.job_id = j.id)
                FROM jobs j {where}
                """,  # noqa: S608 (no input of the test's)
                args,
            ).fetchall()
        statuses: dict[str, int] = {}
        errors: dict[str, int] = {}
        for status, code, *_ in rows:
            statuses[status] = statuses.get(status, 0) + 1
            if code:
                errors[code] = errors.get(code, 0) + 1
        return Outcome(
            jobs=len(rows),
            terminal=sum(1 for r in rows if r[0] in TERMINAL),
            succeeded=statuses.get("succeeded", 0),
            failed=statuses.get("failed", 0),
            duplicate_replies=sum(1 for r in rows if r[3] > 1),
            duplicate_events=sum(1 for r in rows if r[4] > 1),
            max_attempts=max((r[2] for r in rows), default=0),
            statuses=statuses,
            errors=errors,
        )

    def wait_terminal(self, job_ids: list[str], *, timeout: float) -> tuple[Outcome, float]:
        """Poll until every one of `job_ids` is terminal (or `timeout` passes): the outcome
        and the seconds it took. The database may be away for part of it."""
        started = time.monotonic()
        deadline = started + timeout
        outcome: Outcome | None = None
        while True:
            try:
                outcome = self.outcome(job_ids)
                if outcome.terminal == len(job_ids):
                    return outcome, time.monotonic() - started
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                assert outcome is not None, "the database never answered"
                return outcome, time.monotonic() - started
            time.sleep(0.25)

    # Diagnosis -----------------------------------------------------------------------------

    def require(self, condition: bool, what: str) -> None:
        """Assert `condition`; when it fails, print the unfinished jobs and the processes'
        warnings first (pytest truncates a long assertion message)."""
        if not condition:
            print(f"\nFAILED: {what}\n{self.unfinished()}\n{self.problems()}", flush=True)
        assert condition, what

    def unfinished(self, limit: int = 10) -> str:
        """The unfinished jobs (first `limit`), and what the broker holds."""
        lines = []
        with contextlib.suppress(psycopg.Error):
            with self.db() as conn:
                rows = conn.execute(
                    """
                    SELECT j.id, j.turn, j.status, j.attempts, j.enqueued_at, j.lease_expires_at,
                           NOT EXISTS (SELECT 1 FROM jobs e WHERE e.conversation_id
                               = j.conversation_id AND e.turn < j.turn
                               AND e.status IN ('queued', 'running')) AS next,
                           now()
                    FROM jobs j WHERE j.status IN ('queued', 'running')
                    ORDER BY j.created_at
                    """,
                ).fetchall()
            nexts = sum(1 for r in rows if r[6])
            lines.append(f"  {len(rows)} unfinished, {nexts} of them next in their conversation")
            lines += [f"  {r}" for r in rows[:limit]]
        with contextlib.suppress(redis.RedisError):
            broker = self.redis_client(1)
            lines.append(
                f"  broker: queue {broker.llen('parley.turns')}, unacked {broker.hlen('unacked')}, "
                f"marker {broker.get(BROKER_MARKER)!r}"
            )
        return "unfinished jobs (id, turn, status, attempts, enqueued, lease, next, now):\n" + (
            "\n".join(lines)
        )

    def problems(self, lines: int = 40) -> str:
        """The last warning and error lines of Parley's processes (their log)."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        bad = [
            line
            for line in text
            if any(w in line for w in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback", "Error"))
        ]
        return f"log {self.log}:\n" + "\n".join(bad[-lines:])


def _running(process: psutil.Process) -> bool:
    """Not ended: a zombie has ended (its parent was killed; init reaps it when it will)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _job_ids(messages: Any) -> set[str]:
    # Celery's message headers name the task's arguments in plain text (argsrepr).
    return {job for value in messages for job in re.findall(r"job_[0-9a-z]+", str(value))}


def report(scenario: str, accepted: int, outcome: Outcome, recovery_s: float, **extra: Any) -> str:
    """The scenario's figures on one line (shown with pytest -s)."""
    parts = [
        f"scenario={scenario}",
        f"accepted={accepted}",
        f"terminal={outcome.terminal}",
        f"succeeded={outcome.succeeded}",
        f"failed={outcome.failed}",
        f"duplicate_replies={outcome.duplicate_replies}",
        f"recovery_s={recovery_s:.1f}",
        *(f"{k}={v}" for k, v in extra.items()),
    ]
    line = "FAULT " + " ".join(parts)
    print("\n" + line, flush=True)
    return line


class Submitter(threading.Thread):
    """Submits turns continuously (new conversations) until stopped; records every answer."""

    def __init__(
        self, base_url: str, key: str, *, max_new_tokens: int = 4, pause_s: float = 0.02
    ) -> None:
        super().__init__(name="fault-submitter", daemon=True)
        self.base_url = base_url
        self.key = key
        self.max_new_tokens = max_new_tokens
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.accepted: list[str] = []
        self.answers: list[tuple[float, int, str, str]] = []  # (time, status, type, body)
        self.transport_errors = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        body = {
            "message": "Hello under load.",
            "generation": {"max_new_tokens": self.max_new_tokens},
        }
        with httpx.Client(base_url=self.base_url, timeout=15) as client:
            while not self.stop.is_set():
                try:
                    answer = client.post("/v1/jobs", headers=headers, json=body)
                except httpx.HTTPError:
                    self.transport_errors += 1
                    self.stop.wait(0.1)
                    continue
                kind = answer.headers.get("content-type", "")
                self.answers.append((time.monotonic(), answer.status_code, kind, answer.text))
                if answer.status_code == 202:
                    self.accepted.append(str(answer.json()["id"]))
                self.stop.wait(self.pause_s)
