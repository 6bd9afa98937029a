"""`parley.enforce_retention`: delete transcripts older than TRANSCRIPT_RETENTION_DAYS.

Sent by `parley beat` (celeryconfig.beat_schedule) to the maintenance queue. A shared task:
every Celery app that imports this module (celeryconfig's `imports`) can run it, so the I/O
worker takes it without loading the model. Safe to run twice or at once on two workers: each
batch locks what it deletes and skips what another holds.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from app.admin.retention import enforce_retention
from app.config import get_settings


@shared_task(name="parley.enforce_retention", ignore_result=True)
def enforce_retention_task() -> dict[str, Any]:
    report = enforce_retention(get_settings())
    return {
        "cutoff": report.cutoff.isoformat() if report.cutoff else None,
        "conversations": report.conversations,
        "messages": report.messages,
        "jobs": report.jobs,
    }
