"""`parley.deliver_webhook`: one delivery attempt of a webhook event, on the I/O worker.

Safe to run twice or late: the attempt is claimed by a conditional update in the database,
so a duplicate or stale message finds nothing due and does nothing.
"""

from __future__ import annotations

from app.config import get_settings
from app.webhooks.delivery import deliver
from worker.io_app import app


@app.task(name="parley.deliver_webhook", ignore_result=True)
def deliver_webhook(event_id: str) -> None:
    deliver(event_id, get_settings())
