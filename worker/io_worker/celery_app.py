"""The Celery app of the I/O worker (`parley io-worker`): webhook deliveries and their sweep.

Kept apart from worker.turn_worker.celery_app, whose worker_init loads the model: this module never
imports it (Celery's signals are process-wide), so an I/O worker holds no model and no GPU
and can run many deliveries at once on threads.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from app.config import get_settings
from app.logs import configure_logging
from celeryconfig import celery_config
from worker.io_worker.delivery import sweep_due

log = logging.getLogger("parley.io_worker")

app = Celery("parley-io")
app.conf.update(celery_config(get_settings()))
app.conf.include = ["worker.io_worker.tasks"]

_stop = threading.Event()
_thread: threading.Thread | None = None


def _sweep_loop() -> None:
    """Send due webhook attempts to the queue: the retry schedule is kept in the database."""
    settings = get_settings()
    while not _stop.is_set():
        try:
            sent = sweep_due(settings)
            if sent:
                log.info("webhook sweep: %d due attempts sent", sent)
        except Exception:
            log.exception("webhook sweep failed; retrying")
        _stop.wait(settings.webhook_sweep_interval_seconds)


@worker_ready.connect
def _start_sweep(**_: Any) -> None:
    global _thread
    configure_logging()
    if _thread is None:
        _stop.clear()
        _thread = threading.Thread(target=_sweep_loop, name="parley-webhook-sweep", daemon=True)
        _thread.start()


@worker_shutdown.connect
def _stop_sweep(**_: Any) -> None:
    global _thread
    _stop.set()
    if _thread is not None:
        _thread.join(timeout=5)
        _thread = None
