"""A worker's background thread: heartbeats for /readyz, and the periodic reconciler."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from app.config import get_settings
from app.redis import get_redis, publish_worker_metrics, report_worker_alive
from worker.turn_worker import metrics
from worker.turn_worker.reconciler import reconcile

log = logging.getLogger("parley.worker")

_RECONCILE_LOCK = "parley:reconcile-lock"
_stop = threading.Event()
_thread: threading.Thread | None = None


def _loop(name: str) -> None:
    settings = get_settings()
    redispatch_after = timedelta(seconds=max(300, settings.turn_lease_seconds))
    next_reconcile = 0.0
    while not _stop.is_set():
        try:
            client = get_redis()
            report_worker_alive(client, name)
            publish_worker_metrics(client, name, _metrics_snapshot())
            now = time.monotonic()
            # One worker at a time reconciles: the lock's expiry spaces the runs out.
            if now >= next_reconcile:
                next_reconcile = now + settings.reconcile_interval_seconds
                if client.set(
                    _RECONCILE_LOCK, name, nx=True, ex=settings.reconcile_interval_seconds
                ):
                    reconcile(settings, redispatch_after=redispatch_after)
        except Exception:
            log.exception("heartbeat/reconcile round failed; retrying")
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
