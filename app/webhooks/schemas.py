from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from app.models import WebhookStatus


class WebhookSecretOut(BaseModel):
    secret: str


class WebhookState(BaseModel):
    """A Job's `webhook` field."""

    url: str
    status: WebhookStatus
    attempts: int


class WebhookAttemptOut(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int
