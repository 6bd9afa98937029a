"""Celery configuration for Parley's workers and for the API's send-only client.

`celery_config(settings)` is the whole configuration; each Celery app applies it when it is
made (`worker.turn_worker.celery_app`, `worker.io_worker.celery_app`, `app.queue`), so that
importing this module reads no settings and its queue names can be imported anywhere.
"""

from __future__ import annotations

from typing import Any

from app.config import Settings

TURNS_QUEUE = "parley.turns"
# Periodic upkeep (transcript retention), sent by `parley beat`: for the I/O worker.
MAINTENANCE_QUEUE = "parley.maintenance"
# Webhook deliveries: consumed by the I/O worker (`parley io-worker`), never by a GPU worker.
WEBHOOKS_QUEUE = "parley.webhooks"


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.celery_broker_url,
        # Job state lives in PostgreSQL; Celery's result backend is never read.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "task_default_queue": TURNS_QUEUE,
        "task_routes": {
            "parley.run_turn": {"queue": TURNS_QUEUE},
            "parley.enforce_retention": {"queue": MAINTENANCE_QUEUE},
            "parley.deliver_webhook": {"queue": WEBHOOKS_QUEUE},
        },
        # A turn is acknowledged only once it has ended, so a worker that dies mid-turn leaves
        # it to be redelivered; each process takes one message at a time so that long turns do
        # not hold back queued ones in a prefetch buffer.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Must exceed the longest turn (time cap plus queueing inside the worker), or the
        # broker hands a running turn to a second worker; that copy would store nothing, but
        # wastes a slot.
        "broker_transport_options": {
            "visibility_timeout": max(3600, int(settings.generation_time_limit_seconds) * 4),
        },
        "broker_connection_retry_on_startup": True,
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
        # `parley beat` sends these. A message no worker took before the next run is due
        # expires instead of piling up.
        "beat_schedule": {
            "enforce-retention": {
                "task": "parley.enforce_retention",
                "schedule": float(settings.retention_interval_seconds),
                "options": {"expires": float(settings.retention_interval_seconds)},
            },
        },
    }
