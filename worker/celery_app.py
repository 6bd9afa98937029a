"""The Celery app of Parley's workers, configured from celeryconfig.py."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown

from app.logs import configure_logging

app = Celery("parley")
app.config_from_object("celeryconfig")
app.conf.include = ["worker.tasks.run_turn"]


@worker_init.connect
def _load_model(**_: Any) -> None:
    # Loaded once per worker process, before it takes any task; the GPU launcher has set
    # CUDA_VISIBLE_DEVICES before this process started (invariant 6).
    from worker.runtime import start_runtime

    configure_logging()
    start_runtime()


@worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    from worker.background import start_background

    start_background(name=getattr(sender, "hostname", None) or "worker")


@worker_shutdown.connect
def _stop_background(**_: Any) -> None:
    from worker.background import stop_background

    stop_background()
