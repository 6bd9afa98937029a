"""A worker's background thread, once a heartbeat: renew the leases of the turns it runs,
report itself alive for /readyz with its metrics, and run the reconciler.

Each part stands alone: Redis being away stops neither the lease renewals nor the
reconciler (both in PostgreSQL), and a database outage stops neither the heartbeat in Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.config import Settings, get_settings
from app.db import session_scope
from app.jobs import lifecycle
from app.redis import get_redis, publish_worker_metrics, report_worker_alive
from worker.turn_worker import metrics
from worker.turn_worker.held_claims import HELD
from worker.turn_worker.reconciler import reconcile

log = logging.getLogger("parley.worker")

_stop = threading.Event()
_thread: threading.Thread | None = None


def _renew_leases(settings: Settings) -> None:
    tokens = HELD.tokens()
    if tokens:
        with session_scope() as session:
            lifecycle.renew_leases(
                session, tokens=tokens, lease_seconds=settings.turn_lease_seconds
            )


def _report_alive(name: str) -> None:
    client = get_redis()
    report_worker_alive(client, name)
    publish_worker_metrics(client, name, _metrics_snapshot())


def _loop(name: str) -> None:
    settings = get_settings()
    next_reconcile = 0.0
    while not _stop.is_set():
        now = time.monotonic()
        parts: list[tuple[str, Callable[[], object]]] = [
            ("lease renewal", lambda: _renew_leases(settings))
        ]
        parts.append(("heartbeat", lambda: _report_alive(name)))
        if now >= next_reconcile:
            next_reconcile = now + settings.reconcile_interval_seconds
            parts.append(("reconcile", lambda: reconcile(settings)))
        for label, part in parts:
            try:
                part()
            except Exception as exc:
                # The next heartbeat tries again; a backing service may be restarting.
                log.warning("%s failed (%s: %s); retrying", label, type(exc).__name__, exc)
        _stop.wait(settings.worker_heartbeat_seconds)


def _metrics_snapshot() -> bytes:
    # Not at the top: this module is imported with the Celery app, which loads no torch.
    from worker.turn_worker.runtime import current_runtime

    runtime = current_runtime()
    if runtime is not None:
        metrics.RUNNING_TURNS.set(runtime.engine.running)
    return metrics.snapshot()


def start_background(*, name: str) -> None:
    global _thread
    if _thread is None:
        _stop.clear()
        _thread = threading.Thread(target=_loop, args=(name,), name="parley-heartbeat", daemon=True)
        _thread.start()


def stop_background() -> None:
    global _thread
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
        _thread = None
