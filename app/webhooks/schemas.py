from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class WebhookSecretOut(BaseModel):
    secret: str


class WebhookAttemptOut(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int
