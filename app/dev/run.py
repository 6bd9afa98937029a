"""`parley dev`: the whole service on one machine (API, model worker, I/O worker, beat), in
the foreground.

Uses DATABASE_URL, REDIS_URL and BROKER_URL when they are set; otherwise starts an embedded
PostgreSQL and two Redis servers (the context cache, and the broker with noeviction) with their
data under ./.parley/. Builds the tiny model when MODEL_ID is unset.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from app.config import get_settings
from app.dev.postgres import LocalPostgres
from app.dev.redis_server import LocalRedis
from app.dev.stack import Stack, ensure_model
from app.migrate import upgrade_database

DATA_DIR = Path(".parley")


def _say(text: str) -> None:
    print(f"parley dev: {text}", flush=True)


def _admin_key() -> str:
    # Kept across runs so that the key printed last time still works.
    path = DATA_DIR / "admin_key"
    if path.exists():
        return path.read_text().strip()
    key = "pk_admin_" + secrets.token_urlsafe(24)
    path.write_text(key)
    path.chmod(0o600)
    return key


def run_dev(*, host: str, port: int) -> int:
    started = time.monotonic()
    DATA_DIR.mkdir(exist_ok=True)
    given = get_settings().model_fields_set
    with ExitStack() as services:
        if "database_url" not in given:
            postgres = services.enter_context(LocalPostgres(DATA_DIR / "postgres"))
            os.environ["DATABASE_URL"] = postgres.create_database("parley")
            _say("embedded PostgreSQL started (data in .parley/postgres)")
        if "redis_url" not in given:
            redis = services.enter_context(LocalRedis(DATA_DIR / "redis"))
            os.environ["REDIS_URL"] = redis.url
            _say(f"embedded Redis started on {redis.url} (context cache)")
            if "broker_url" not in given:
                # The broker on a server of its own that never evicts (reliability F12).
                broker = services.enter_context(
                    LocalRedis(DATA_DIR / "broker", settings={"maxmemory-policy": "noeviction"})
                )
                os.environ["BROKER_URL"] = broker.url
                _say(f"embedded Redis started on {broker.url} (broker, noeviction)")
        if "model_id" not in given:
            _say("using the tiny local model (built once, no download needed)")
            os.environ["MODEL_ID"] = str(ensure_model(DATA_DIR / "models" / "tiny"))
        if "parley_admin_key" not in given:
            os.environ["PARLEY_ADMIN_KEY"] = _admin_key()
        get_settings.cache_clear()
        settings = get_settings()
        upgrade_database(settings.database_url)
        _say("migrations applied")

        stack = services.enter_context(Stack())
        stack.turn_worker(gpus="auto")
        stack.io_worker(concurrency=8)
        stack.beat(DATA_DIR)
        stack.api(host=host, port=port)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        if not stack.wait_ready(timeout=180, stop=stop):
            if stop.is_set():
                return 0
            _say("the API or the worker did not become ready; see the log above")
            return 1
        _say(f"ready in {time.monotonic() - started:.1f}s")
        _say(f"API docs:  {stack.base_url}/docs")
        _say(f"admin key: {settings.parley_admin_key}")
        _say("Ctrl-C stops everything")
        while not stack.exited() and not stop.wait(0.5):
            pass
        _say("stopping" if stop.is_set() else "a process exited; stopping")
        return 0 if stop.is_set() else 1
