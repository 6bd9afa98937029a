"""The Celery app of the turn worker (`parley worker`), configured from celeryconfig.py."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown

from app.config import get_settings
from app.logs import configure_logging
from celeryconfig import celery_config

app = Celery("parley")
app.conf.update(celery_config(get_settings()))
app.conf.include = ["worker.turn_worker.run_turn"]


@worker_init.connect
def _load_model(**_: Any) -> None:
    # Loaded once per worker process, before it takes any task; the GPU launcher has set
    # CUDA_VISIBLE_DEVICES before this process started (invariant 6). Imported here, not with
    # the app, so that Celery's control commands (`celery -A ... inspect`) load no torch.
    from worker.turn_worker.runtime import start_runtime

    configure_logging()
    start_runtime()


@worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    from worker.turn_worker.heartbeat import start_background

    start_background(name=getattr(sender, "hostname", None) or "worker")


@worker_shutdown.connect
def _stop_background(**_: Any) -> None:
    from worker.turn_worker.heartbeat import stop_background
    from worker.turn_worker.runtime import current_runtime

    stop_background()
    runtime = current_runtime()
    if runtime is not None:
        # The last turns' ends, queued for their streams, are sent before the process goes.
        runtime.events.close()
        runtime.engine.close()
