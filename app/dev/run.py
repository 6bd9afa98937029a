"""`parley dev`: the whole service on one machine (API, model worker, I/O worker, beat), in
the foreground.

Uses DATABASE_URL and REDIS_URL when they are set; otherwise starts an embedded PostgreSQL
and Redis with their data under ./.parley/. Builds the tiny model when MODEL_ID is unset.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from app.config import get_settings
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


def _wait_http(
    url: str, timeout: float, procs: list[subprocess.Popen[bytes]], stop: threading.Event
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 (our own URL)
                if answer.status == 200:
                    return True
        except OSError:
            pass
        stop.wait(0.3)
    return False


def run_dev(*, host: str, port: int) -> int:
    started = time.monotonic()
    DATA_DIR.mkdir(exist_ok=True)
    given = get_settings().model_fields_set
    with ExitStack() as stack:
        if "database_url" not in given:
            from app.dev import LocalPostgres

            postgres = stack.enter_context(LocalPostgres(DATA_DIR / "postgres"))
            os.environ["DATABASE_URL"] = postgres.create_database("parley")
            _say("embedded PostgreSQL started (data in .parley/postgres)")
        if "redis_url" not in given:
            from app.dev import LocalRedis

            redis = stack.enter_context(LocalRedis(DATA_DIR / "redis"))
            os.environ["REDIS_URL"] = redis.url
            _say(f"embedded Redis started on {redis.url}")
        if "model_id" not in given:
            model_dir = DATA_DIR / "models" / "tiny"
            if not (model_dir / "config.json").exists():
                _say("building the tiny model (no download needed)")
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "worker.inference.model_init",
                        str(model_dir),
                        "--size",
                        "tiny",
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            os.environ["MODEL_ID"] = str(model_dir.resolve())
        if "parley_admin_key" not in given:
            os.environ["PARLEY_ADMIN_KEY"] = _admin_key()
        get_settings.cache_clear()
        settings = get_settings()

        upgrade_database(settings.database_url)
        _say("migrations applied")

        procs = [
            subprocess.Popen([sys.executable, "-m", "worker.gpus", "--gpus", "auto"]),
            subprocess.Popen([sys.executable, "-m", "app.cli", "io-worker", "--concurrency", "8"]),
            subprocess.Popen(
                [sys.executable, "-m", "app.cli", "beat", "--data-dir", str(DATA_DIR)]
            ),
            subprocess.Popen(
                [sys.executable, "-m", "app.cli", "api", "--host", host, "--port", str(port)]
            ),
        ]

        def _stop(*_: object) -> None:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

        stack.callback(_wait_all, procs)
        stack.callback(_stop)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        base = f"http://{host}:{port}"
        if not _wait_http(f"{base}/readyz", 180, procs, stop):
            if stop.is_set():
                return 0
            _say("the API or the worker did not become ready; see the log above")
            return 1
        _say(f"ready in {time.monotonic() - started:.1f}s")
        _say(f"API docs:  {base}/docs")
        _say(f"admin key: {settings.parley_admin_key}")
        _say("Ctrl-C stops everything")
        while all(p.poll() is None for p in procs) and not stop.wait(0.5):
            pass
        _say("stopping" if stop.is_set() else "a process exited; stopping")
        return 0 if stop.is_set() else 1


def _wait_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
