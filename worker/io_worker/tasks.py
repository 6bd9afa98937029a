"""The I/O worker's Celery tasks.

`parley.deliver_webhook`: one delivery attempt of a webhook event. Safe to run twice or late:
the attempt is claimed by a conditional update in the database, so a duplicate or stale
message finds nothing due and does nothing.

`parley.enforce_retention`: delete transcripts older than TRANSCRIPT_RETENTION_DAYS; sent by
`parley beat` (celeryconfig's beat schedule) to the maintenance queue. Safe to run twice or at
once on two workers: each batch locks what it deletes and skips what another holds.
"""

from __future__ import annotations

from typing import Any

from app.config import get_settings
from worker.io_worker.celery_app import app
from worker.io_worker.delivery import deliver
from worker.io_worker.retention import enforce_retention


@app.task(name="parley.deliver_webhook", ignore_result=True)
def deliver_webhook(event_id: str) -> None:
    deliver(event_id, get_settings())


@app.task(name="parley.enforce_retention", ignore_result=True)
def enforce_retention_task() -> dict[str, Any]:
    report = enforce_retention(get_settings())
    return {
        "cutoff": report.cutoff.isoformat() if report.cutoff else None,
        "conversations": report.conversations,
        "messages": report.messages,
        "jobs": report.jobs,
    }
